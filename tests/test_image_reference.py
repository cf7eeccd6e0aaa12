"""Image references normalize as docker and the kubelet normalize them."""

from __future__ import annotations

import pytest

from images.reference import InvalidReferenceError, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("name", "domain", "path", "tag", "digest", "full"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None, "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None, "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io", "library/busybox", "latest", None, "docker.io/library/busybox:latest"),
        ("someone/app:v1", "docker.io", "someone/app", "v1", None, "docker.io/someone/app:v1"),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None, "docker.io/library/busybox:latest"),
        ("index.docker.io/busybox", "docker.io", "library/busybox", "latest", None, "docker.io/library/busybox:latest"),
        ("registry.k8s.io/pause:3.9", "registry.k8s.io", "pause", "3.9", None, "registry.k8s.io/pause:3.9"),
        ("localhost/app", "localhost", "app", "latest", None, "localhost/app:latest"),
        ("localhost:5000/a/b/c:t", "localhost:5000", "a/b/c", "t", None, "localhost:5000/a/b/c:t"),
        ("127.0.0.1:5000/x", "127.0.0.1:5000", "x", "latest", None, "127.0.0.1:5000/x:latest"),
        ("host:5000/x:5000", "host:5000", "x", "5000", None, "host:5000/x:5000"),
        ("Example.COM/app", "Example.COM", "app", "latest", None, "Example.COM/app:latest"),
        ("a.b/c-d_e.f__g:T_1.x-y", "a.b", "c-d_e.f__g", "T_1.x-y", None, "a.b/c-d_e.f__g:T_1.x-y"),
        (f"busybox@{DIGEST}", "docker.io", "library/busybox", None, DIGEST, f"docker.io/library/busybox@{DIGEST}"),
        (f"q.io/x:1@{DIGEST}", "q.io", "x", "1", DIGEST, f"q.io/x:1@{DIGEST}"),
    ],
)
def test_normalizes_like_docker(name: str, domain: str, path: str, tag: str | None, digest: str | None, full: str):
    ref = parse_reference(name)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == (domain, path, tag, digest)
    assert str(ref) == full
    assert ref.name == f"{domain}/{path}"
    assert ref.original == name
    assert ref.locator == (digest or tag)


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (" busybox", "whitespace"),
        ("Busybox", "lowercase"),
        ("docker.io/Library/busybox", "lowercase"),
        ("quay.io/Team/app:1", "lowercase"),
        ("busybox:", "tag"),
        ("busybox:-bad", "tag"),
        ("busybox:" + "a" * 129, "tag"),
        ("busybox@sha256:abc", "digest"),
        ("busybox@sha256:" + "AB" * 32, "sha256"),
        ("busybox@md5:" + "ab" * 16, "unsupported digest algorithm"),
        ("ab" * 32, "64-byte hexadecimal"),
        ("a//b", "repository path"),
        ("a/b/", "repository path"),
        ("-a.io/b", "registry host"),
        ("a.io/b__-c", "repository path"),
        ("a.io/" + "b" * 260, "more than 255"),
        (":tag", "no repository"),
    ],
)
def test_rejects_malformed_names(name: str, says: str):
    with pytest.raises(InvalidReferenceError, match=says):
        parse_reference(name)


def test_equal_references_hash_alike_whatever_was_written():
    assert parse_reference("busybox") == parse_reference("docker.io/library/busybox:latest")
    assert len({parse_reference("busybox"), parse_reference("index.docker.io/library/busybox")}) == 1
