"""images/: pulls from a real docker-registry on 127.0.0.1, the store, unpacking, container roots, GC.
No mocks: images are built with images.build and pushed over the registry API."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from images.auth import Credential, credentials_from_dockerconfigjson, matching_credentials, parse_challenge
from images.build import (
    BUSYBOX_PATH,
    Device,
    Dir,
    File,
    Hardlink,
    Layer,
    Symlink,
    busybox_applet_links,
    busybox_applet_listing,
    busybox_files,
    push_image,
    random_files,
)
from images.local_registry import Registry, start_registry
from images.platform import node_platform
from images.reference import InvalidReferenceError, parse_reference
from images.registry_client import RegistryClient
from images.rootfs import mounts_under
from images.service import Image, ImageNotFoundError, ImageService, PullError
from images.users import UnknownUserError, resolve_user

pytest_plugins = ["registry_fixture"]  # the registry and busybox_ref fixtures
ARCH = node_platform()[1]


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ImageService]:
    svc = ImageService(tmp_path / "images")
    yield svc
    await svc.close()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def skopeo_digest(ref: str) -> str:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"], check=True, capture_output=True
    ).stdout
    return "sha256:" + hashlib.sha256(out).hexdigest()


def skopeo_raw(ref: str) -> dict:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"], check=True, capture_output=True
    ).stdout
    return json.loads(out)


async def chroot_sh(root: Path, script: str) -> bytes:
    """Run busybox sh inside root (no namespaces: enough to show the root is complete and usable)."""
    proc = await asyncio.create_subprocess_exec(
        "chroot", str(root), "/bin/sh", "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    return out


def mountinfo_mentions(path: Path) -> bool:
    return str(path) in Path("/proc/self/mountinfo").read_text()


def dockerconfigjson_secret_data(host: str, user: str, password: str) -> dict[str, str]:
    """The `data` of a kubernetes.io/dockerconfigjson Secret, as the API server returns it."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    config = {"auths": {host: {"username": user, "password": password, "auth": auth}}}
    return {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()}


# -- pulling --------------------------------------------------------------------------------------


async def test_pull_by_tag_unpacks_a_runnable_busybox(service: ImageService, registry: Registry, busybox_ref: str):
    ref = parse_reference(busybox_ref)
    assert service.present(ref) is None
    image = await service.pull(ref)

    assert image.reference == busybox_ref
    assert image.name == f"{registry.host}/busybox"
    assert image.digest == skopeo_digest(busybox_ref)  # skopeo: an independent client agrees
    assert image.image_id == f"{registry.host}/busybox@{image.digest}"
    assert image.config == {"Entrypoint": None, "Cmd": ["sh"], "Env": [f"PATH={BUSYBOX_PATH}"], "WorkingDir": "/"}
    manifest = skopeo_raw(busybox_ref)
    assert image.size == sum(layer["size"] for layer in manifest["layers"])
    assert 500_000 < image.size < 2_000_000

    root = image.rootfs
    assert (root / "bin/busybox").stat().st_mode & 0o777 == 0o755
    assert os.readlink(root / "bin/sh") == "busybox"
    assert os.readlink(root / "bin/tar") == "busybox"  # every applet, where busybox installs it
    assert os.readlink(root / "usr/sbin/httpd") == "../../bin/busybox"
    assert (root / "sbin/ip").resolve() == (root / "bin/busybox").resolve()
    assert "nobody:x:65534:65534" in (root / "etc/passwd").read_text()
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert await chroot_sh(root, "echo hi from $(id -u)") == b"hi from 0\n"

    again = service.present(ref)
    assert again is not None and again.digest == image.digest and again.rootfs == root
    assert [(i.image_id, i.tags) for i in service.list_images()] == [(image.image_id, [busybox_ref])]
    for blob in (image.digest, image.config_digest, *[layer["digest"] for layer in manifest["layers"]]):
        assert (service.root / "blobs/sha256" / blob.split(":")[1]).is_file()


def test_busybox_applets_come_from_the_binary_with_their_install_paths():
    listing = "bin/busybox\nbin/sh\nbin/tar\nsbin/ip\nusr/bin/[\nusr/sbin/httpd\nlinuxrc\n"
    assert busybox_applet_links(listing) == {
        "bin/sh": "busybox",
        "bin/tar": "busybox",
        "sbin/ip": "../bin/busybox",
        "usr/bin/[": "../../bin/busybox",
        "usr/sbin/httpd": "../../bin/busybox",
        "linuxrc": "bin/busybox",
    }
    if os.path.exists("/bin/busybox"):  # Debian's busybox-static: all of it, tar for kubectl cp included
        links = busybox_applet_links(busybox_applet_listing())
        assert len(links) > 200 and {"bin/tar", "bin/sh", "usr/sbin/httpd", "sbin/ip"} <= set(links)


def test_an_unreadable_index_is_set_aside(tmp_path: Path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images/images.json").write_text("{not json")
    svc = ImageService(tmp_path / "images")
    assert svc.index.records == {}
    assert (tmp_path / "images/images.broken").read_text() == "{not json"


async def test_pull_by_digest_and_present_after_restart(tmp_path: Path, registry: Registry, busybox_ref: str):
    digest = skopeo_digest(busybox_ref)
    by_digest = parse_reference(f"{registry.host}/busybox@{digest}")
    svc = ImageService(tmp_path / "images")
    image = await svc.pull(by_digest)
    await svc.close()
    assert image.digest == digest and image.reference == f"{registry.host}/busybox@{digest}"

    restarted = ImageService(tmp_path / "images")  # a new agent process: the JSON index is the memory
    assert restarted.present(by_digest) is not None
    assert restarted.present(parse_reference(busybox_ref)) is None  # pulled by digest: no tag recorded
    assert restarted.present(parse_reference(f"{registry.host}/other@{digest}")) is None
    await restarted.close()


async def test_index_resolves_to_this_platform(service: ImageService, registry: Registry):
    repo = unique("multi")
    platforms = [("linux", "arm64", "v8"), ("linux", "s390x"), ("linux", ARCH), ("windows", ARCH)]
    index_digest = await push_image(registry.url, repo, "1", {"hello": b"hi\n"}, platforms=platforms)
    index = skopeo_raw(f"{registry.host}/{repo}:1")
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    mine = next(m for m in index["manifests"] if m["platform"] == {"os": "linux", "architecture": ARCH})

    image = await service.pull(parse_reference(f"{registry.host}/{repo}:1"))
    assert image.digest == index_digest  # the image ID names what the tag points to, like containerd
    assert image.manifest_digest == mine["digest"]
    assert (image.rootfs / "hello").read_bytes() == b"hi\n"


async def test_docker_manifest_list_and_no_matching_platform(tmp_path: Path, registry: Registry):
    repo = unique("dockerlist")
    platforms = [("linux", "arm", "v7"), ("linux", "arm64", "v8")]
    await push_image(registry.url, repo, "1", {"f": b"x"}, platforms=platforms, media_types="docker")
    ref = parse_reference(f"{registry.host}/{repo}:1")

    arm = ImageService(tmp_path / "arm", platform=("linux", "arm", "v7"))
    assert (await arm.pull(ref)).manifest_digest == skopeo_raw(str(ref))["manifests"][0]["digest"]
    await arm.close()

    other = ImageService(tmp_path / "other", platform=("linux", "riscv64"))
    with pytest.raises(PullError, match=r"no matching manifest for linux/riscv64.*linux/arm/v7"):
        await other.pull(ref)
    await other.close()


@pytest.mark.parametrize(
    ("media_types", "compression"), [("oci", "gzip"), ("oci", "zstd"), ("oci", "none"), ("docker", "gzip")]
)
async def test_layer_compressions(service: ImageService, registry: Registry, media_types, compression):
    repo = unique(f"comp-{compression}")
    layers = [{"one/a": b"a" * 1000}, {"one/b": b"b", "two/c": File(b"c", 0o600)}]
    await push_image(registry.url, repo, "v", layers=layers, media_types=media_types, compression=compression)
    image = await service.pull(parse_reference(f"{registry.host}/{repo}:v"))
    assert (image.rootfs / "one/a").read_bytes() == b"a" * 1000
    assert (image.rootfs / "one/b").read_bytes() == b"b"
    assert stat.S_IMODE((image.rootfs / "two/c").stat().st_mode) == 0o600


async def test_unknown_tag_and_repository_are_not_found(service: ImageService, registry: Registry, busybox_ref: str):
    with pytest.raises(ImageNotFoundError, match=rf"{registry.host}/busybox:nope: not found.*MANIFEST_UNKNOWN"):
        await service.pull(parse_reference(f"{registry.host}/busybox:nope"))
    with pytest.raises(ImageNotFoundError, match="no/such/repo:1: not found"):
        await service.pull(parse_reference(f"{registry.host}/no/such/repo:1"))
    missing = "sha256:" + "0" * 64
    with pytest.raises(ImageNotFoundError):
        await service.pull(parse_reference(f"{registry.host}/busybox@{missing}"))


def test_malformed_names_are_invalid_not_pull_errors():
    for name in ("upper/Case", "busybox@sha256:xyz", "", "a::b"):
        with pytest.raises(InvalidReferenceError):
            parse_reference(name)


async def test_unreachable_registry_is_a_pull_error_naming_it(service: ImageService):
    with pytest.raises(PullError, match=r"127\.0\.0\.1:9/x:1: cannot reach http://127\.0\.0\.1:9") as err:
        await service.pull(parse_reference("127.0.0.1:9/x:1"))
    assert not isinstance(err.value, ImageNotFoundError)


async def test_corrupt_layer_in_registry_is_detected(service: ImageService, registry: Registry):
    repo = unique("corrupt")
    await push_image(registry.url, repo, "1", random_files(64 << 10), compression="none")
    layer = skopeo_raw(f"{registry.host}/{repo}:1")["layers"][0]["digest"]
    data = bytearray(registry.blob_path(layer).read_bytes())
    data[1000] ^= 0xFF  # same length, other bytes: only the digest can tell
    registry.blob_path(layer).write_bytes(bytes(data))

    with pytest.raises(PullError, match=rf"{repo}:1.*{layer}.*digest mismatch") as err:
        await service.pull(parse_reference(f"{registry.host}/{repo}:1"))
    assert not isinstance(err.value, ImageNotFoundError)
    assert not service.blobs.has(layer)
    assert list(service.blobs.ingest.iterdir()) == []  # the partial download is gone
    assert service.present(parse_reference(f"{registry.host}/{repo}:1")) is None


async def test_manifest_not_matching_its_digest_is_rejected(service: ImageService, registry: Registry):
    repo = unique("pinned")
    await push_image(registry.url, repo, "1", {"a": b"1"})
    wrong = "sha256:" + "1" * 64
    with pytest.raises(ImageNotFoundError):  # the registry does not have it under that digest
        await service.pull(parse_reference(f"{registry.host}/{repo}@{wrong}"))


async def test_concurrent_pulls_share_one_download(service: ImageService, registry: Registry, busybox_ref: str):
    ref = parse_reference(busybox_ref)
    tasks = [asyncio.create_task(service.pull(ref)) for _ in range(5)]
    await asyncio.sleep(0)
    assert len(service._pulls) == 1
    images = await asyncio.gather(*tasks)
    assert len({(i.digest, i.rootfs) for i in images}) == 1
    assert len(service.index.records) == 1


# -- layers ---------------------------------------------------------------------------------------


async def test_whiteouts_opaque_dirs_links_devices_and_ownership(service: ImageService, registry: Registry):
    repo = unique("layers")
    lower = {
        "a/keep": b"keep",
        "a/gone": b"gone",
        "a/gonedir/deep/file": b"x",
        "opq/old": b"old",
        "opq/sub/old2": b"old2",
        "escape": Symlink("/"),  # absolute: must resolve inside the image, not on the host
        "rel": Symlink("../../../../a"),
    }
    upper = {
        "a/.wh.gone": b"",
        "a/.wh.gonedir": b"",
        "opq/.wh..wh..opq": b"",
        "opq/new": b"new",
        "hard": Hardlink("a/keep"),
        "soft": Symlink("/a/keep"),
        "dev/null": Device("c", 1, 3),
        "suid": File(b"#!/bin/sh\n", 0o4755, uid=65534, gid=65534),
        "home/nobody": Dir(0o700, uid=65534, gid=65534),
    }
    through_links = Layer({"escape/tmp/escaped-" + repo: b"inside", "rel/through-rel": b"r"}, add_parents=False)
    await push_image(registry.url, repo, "1", layers=[lower, upper, through_links])
    root = (await service.pull(parse_reference(f"{registry.host}/{repo}:1"))).rootfs

    assert (root / "a/keep").read_bytes() == b"keep"
    assert not (root / "a/gone").exists() and not (root / "a/gonedir").exists()
    assert sorted(p.name for p in (root / "opq").iterdir()) == ["new"]
    assert not any(p.name.startswith(".wh.") for p in root.rglob("*"))
    assert (root / "hard").stat().st_ino == (root / "a/keep").stat().st_ino
    assert os.readlink(root / "soft") == "/a/keep"
    dev = (root / "dev/null").lstat()
    assert stat.S_ISCHR(dev.st_mode) and (os.major(dev.st_rdev), os.minor(dev.st_rdev)) == (1, 3)
    suid = (root / "suid").stat()
    assert (suid.st_uid, suid.st_gid, stat.S_IMODE(suid.st_mode)) == (65534, 65534, 0o4755)
    home = (root / "home/nobody").stat()
    assert (home.st_uid, stat.S_IMODE(home.st_mode)) == (65534, 0o700)
    assert (root / "tmp" / f"escaped-{repo}").read_bytes() == b"inside"
    assert not Path(f"/tmp/escaped-{repo}").exists()
    assert (root / "a/through-rel").read_bytes() == b"r"


async def test_layers_shared_between_images_are_stored_once(service: ImageService, registry: Registry):
    base = busybox_files()
    one, two = unique("app-one"), unique("app-two")
    await push_image(registry.url, one, "1", layers=[base, {"app": b"one"}])
    await push_image(registry.url, two, "1", layers=[base, {"app": b"two"}])
    first = await service.pull(parse_reference(f"{registry.host}/{one}:1"))
    second = await service.pull(parse_reference(f"{registry.host}/{two}:1"))

    shared = skopeo_raw(f"{registry.host}/{one}:1")["layers"][0]["digest"]
    assert shared == skopeo_raw(f"{registry.host}/{two}:1")["layers"][0]["digest"]
    records = service.index.records
    assert records[first.digest].layers[0] == records[second.digest].layers[0] == shared
    blobs = sorted(p.name for p in (service.root / "blobs/sha256").iterdir())
    # 2 manifests + 2 configs + 1 shared layer + 2 app layers, each once
    assert len(blobs) == 7 and blobs.count(shared.split(":")[1]) == 1
    assert (first.rootfs / "app").read_bytes() == b"one" and (second.rootfs / "app").read_bytes() == b"two"


# -- auth and mirrors -----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["basic", "token"])
async def auth_registry(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    users = {"alice": "s3cret-pw"}
    reg = await start_registry(tmp_path_factory.mktemp(f"auth-{request.param}"), users=users, auth=request.param)
    await push_image(reg.url, "private/app", "1", {"secret": b"42"}, auth=("alice", "s3cret-pw"))
    yield reg
    await reg.stop()


async def test_auth_with_dockerconfigjson_credentials(tmp_path: Path, auth_registry: Registry):
    ref = parse_reference(f"{auth_registry.host}/private/app:1")
    good = credentials_from_dockerconfigjson(dockerconfigjson_secret_data(auth_registry.host, "alice", "s3cret-pw"))
    bad = credentials_from_dockerconfigjson(dockerconfigjson_secret_data(auth_registry.host, "alice", "wrong"))
    elsewhere = credentials_from_dockerconfigjson(dockerconfigjson_secret_data("other.example:5000", "alice", "x"))

    svc = ImageService(tmp_path / "images")
    try:
        with pytest.raises(PullError, match=r"private/app:1: unauthorized.*no imagePullSecret matches"):
            await svc.pull(ref)
        with pytest.raises(PullError, match=r"unauthorized.*no imagePullSecret matches"):
            await svc.pull(ref, elsewhere)
        with pytest.raises(PullError, match=r"private/app:1: unauthorized.*refused the credentials"):
            await svc.pull(ref, bad)
        image = await svc.pull(ref, bad + good)  # the kubelet tries each matching credential in turn
        assert (image.rootfs / "secret").read_bytes() == b"42"
        with pytest.raises(PullError, match="unauthorized"):  # no riding on the credentials cached just now
            await svc.pull(ref)
    finally:
        await svc.close()
    if auth_registry.token_issuer is not None:
        assert auth_registry.token_issuer.issued >= 2
        # the registry checks the tokens' signatures: a forged one is refused
        forged = "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{auth_registry.url}/v2/private/app/manifests/1", headers={"Authorization": forged}) as resp,
        ):
            assert resp.status == 401


async def test_mirror_serves_another_registry_name(tmp_path: Path, registry: Registry, busybox_ref: str):
    svc = ImageService(tmp_path / "images", mirrors={"registry.k8s.io": [registry.url]})
    try:
        image = await svc.pull(parse_reference("registry.k8s.io/busybox:1"))  # no network: only the mirror can serve
        assert image.name == "registry.k8s.io/busybox"
        assert image.digest == skopeo_digest(busybox_ref)
        assert svc.present(parse_reference("registry.k8s.io/busybox:1")) is not None
    finally:
        await svc.close()


async def test_docker_hub_names_through_a_mirror(tmp_path: Path, registry: Registry):
    digest = await push_image(registry.url, "library/hubbox", "1", {"from": b"hub"})
    svc = ImageService(tmp_path / "images", mirrors={"docker.io": [registry.url]})
    try:
        image = await svc.pull(parse_reference("hubbox:1"))  # docker.io/library/hubbox:1
        assert (image.name, image.digest, image.reference) == ("docker.io/library/hubbox", digest, "hubbox:1")
        assert image.image_id == f"docker.io/library/hubbox@{digest}"
        assert svc.present(parse_reference("docker.io/library/hubbox:1")) is not None
    finally:
        await svc.close()


async def test_dead_mirror_falls_back_to_the_registry(tmp_path: Path, registry: Registry, busybox_ref: str):
    svc = ImageService(tmp_path / "images", mirrors={registry.host: ["http://127.0.0.1:9"]})
    try:
        assert (await svc.pull(parse_reference(busybox_ref))).digest == skopeo_digest(busybox_ref)
        with pytest.raises(ImageNotFoundError, match=r"not found.*mirrors failed too.*127\.0\.0\.1:9"):
            await svc.pull(parse_reference(f"{registry.host}/busybox:absent"))
    finally:
        await svc.close()


def test_plain_http_only_for_loopback_and_insecure_registries():
    client = RegistryClient({"docker.io": ["http://127.0.0.1:5000/"]}, {"reg.lan:5000", "other.lan"})

    def bases(name: str) -> list[str]:
        return [ep.base for ep in client.endpoints(parse_reference(name))]

    assert bases("busybox") == ["http://127.0.0.1:5000", "https://registry-1.docker.io"]
    assert bases("reg.lan:5000/x") == ["http://reg.lan:5000"]
    assert bases("other.lan:7000/x") == ["http://other.lan:7000"]
    assert bases("reg.lan/x") == ["https://reg.lan"]
    assert bases("localhost:5000/x") == ["http://localhost:5000"]
    assert bases("127.0.0.1/x") == ["http://127.0.0.1"]
    assert bases("registry.k8s.io/pause:3.9") == ["https://registry.k8s.io"]


def test_credentials_match_hosts_like_the_kubelet():
    data = {
        "auths": {
            "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()},
            "*.example.com": {"username": "wild", "password": "pw"},
            "reg.example.com:5000/team": {"username": "team", "password": "pw"},
            "reg.example.com:5000": {"username": "host", "password": "pw"},
            "empty.example.com": {},
        }
    }
    creds = credentials_from_dockerconfigjson(data)
    assert {c.username for c in creds} == {"hub", "wild", "team", "host"}
    assert "pw" not in repr(creds)

    def users(host: str, path: str) -> list[str]:
        return [c.username for c in matching_credentials(creds, host, path)]

    assert users("docker.io", "library/busybox") == ["hub"]
    assert users("a.example.com", "x") == ["wild"]
    assert users("example.com", "x") == []  # *.example.com needs a label for the star
    assert users("reg.example.com:5000", "team/app") == ["team", "host"]  # most specific first
    assert users("reg.example.com:5000", "other/app") == ["host"]
    assert users("reg.example.com", "team/app") == ["wild"]  # the port must match too
    legacy = credentials_from_dockerconfigjson(
        {".dockercfg": base64.b64encode(json.dumps({"q.io": {"auth": "dTpw"}}).encode()).decode()}
    )
    assert legacy == [Credential("q.io", "u", "p")]


def test_www_authenticate_challenges():
    assert parse_challenge('Bearer realm="https://a/token",service="reg",scope="repository:x/y:pull"') == (
        "bearer",
        {"realm": "https://a/token", "service": "reg", "scope": "repository:x/y:pull"},
    )
    assert parse_challenge('Basic realm="kubelet-emu"') == ("basic", {"realm": "kubelet-emu"})


# -- container roots ------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", [True, False], ids=["overlay", "copy"])
async def test_container_root_is_writable_and_leaves_the_base_alone(
    tmp_path: Path, registry: Registry, busybox_ref: str, overlay: bool
):
    svc = ImageService(tmp_path / "images", use_overlay=overlay)
    image = await svc.pull(parse_reference(busybox_ref))
    container = tmp_path / "containers" / "c1"
    root = await svc.prepare_rootfs(image, container)
    assert mountinfo_mentions(root) is overlay

    (root / "new-file").write_text("mine")
    (root / "etc/passwd").unlink()
    assert await chroot_sh(root, "echo hi > /tmp/x && cat /tmp/x") == b"hi\n"
    assert not (image.rootfs / "new-file").exists() and not (image.rootfs / "tmp/x").exists()
    assert (image.rootfs / "etc/passwd").exists()

    assert await svc.prepare_rootfs(image, container) == root  # again (agent restart): the same root
    assert len(mounts_under(container)) == (1 if overlay else 0)
    assert (root / "new-file").read_text() == "mine"

    other = await svc.prepare_rootfs(image, tmp_path / "containers" / "c2")
    assert (other / "etc/passwd").exists() and not (other / "new-file").exists()

    # A path overlay options cannot carry (a comma) falls back to a copy instead of failing.
    odd = await svc.prepare_rootfs(image, tmp_path / "containers" / "c,3")
    assert not mountinfo_mentions(odd) and (odd / "bin/busybox").exists()
    (odd / "etc/group").write_text("changed")
    assert (image.rootfs / "etc/group").read_text() != "changed"
    await svc.release_rootfs(tmp_path / "containers" / "c,3")

    await svc.release_rootfs(container)
    assert not mountinfo_mentions(container) and not container.exists()
    await svc.release_rootfs(container)  # idempotent

    restarted = ImageService(tmp_path / "images")  # after an agent restart: found through mountinfo
    await restarted.release_rootfs(tmp_path / "containers" / "c2")
    assert not mounts_under(tmp_path / "containers") and not (tmp_path / "containers" / "c2").exists()
    await svc.close()
    await restarted.close()


# -- garbage collection ---------------------------------------------------------------------------


async def test_gc_removes_least_recently_used_unused_images(tmp_path: Path, registry: Registry):
    svc = ImageService(tmp_path / "images", gc_high_percent=85, gc_low_percent=80)
    base = {"shared": b"s" * 1000}
    names = {}
    for label in ("old", "mid", "new"):
        repo = unique(f"gc-{label}")
        await push_image(registry.url, repo, "1", layers=[base, {"own": label.encode()}])
        names[label] = f"{registry.host}/{repo}:1"
    images: dict[str, Image] = {}
    for label in ("old", "mid", "new"):  # pulled in this order: "old" is the least recently used
        images[label] = await svc.pull(parse_reference(names[label]))
        await asyncio.sleep(0.01)
    await svc.prepare_rootfs(images["old"], tmp_path / "c-old")  # in use, though oldest otherwise
    await svc.release_rootfs(tmp_path / "c-old")
    svc.index.records[images["old"].digest].last_used = 0  # make it the oldest again

    assert await svc.garbage_collect(set(), usage=lambda: 50.0) == []  # below the high mark: nothing
    assert len(svc.index.records) == 3

    # Disk full until one image goes: the oldest unused one goes, the in-use one stays.
    def usage() -> float:
        return 90.0 if len(svc.index.records) == 3 else 70.0

    removed = await svc.garbage_collect({images["old"].image_id}, usage=usage)
    assert removed == [images["mid"].image_id]
    assert svc.present(parse_reference(names["mid"])) is None
    assert svc.present(parse_reference(names["old"])) is not None
    assert svc.present(parse_reference(names["new"])) is not None
    assert not images["mid"].rootfs.exists()
    stored = svc.blobs.digests()
    assert images["mid"].digest not in stored and images["mid"].config_digest not in stored
    assert svc.index.records[images["new"].digest].layers[0] in stored  # the shared layer stays

    # Still full: everything unused goes, in-use stays; a base under a mounted container root is in use too.
    await svc.prepare_rootfs(images["new"], tmp_path / "c-new")
    assert await svc.garbage_collect({names["old"]}, usage=lambda: 99.0) == []
    await svc.release_rootfs(tmp_path / "c-new")
    removed = await svc.garbage_collect({names["old"]}, usage=lambda: 99.0)
    assert removed == [images["new"].image_id]
    assert [r.digest for r in svc.index.records.values()] == [images["old"].digest]
    assert ImageService(tmp_path / "images").present(parse_reference(names["new"])) is None  # persisted
    shutil.rmtree(tmp_path / "images")
    await svc.close()


def tree(root: Path) -> dict[str, tuple]:
    """What a root holds: per path the type, mode, owner, link target or content digest."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            what: object = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            what = (os.major(st.st_rdev), os.minor(st.st_rdev))
        else:
            what = None
        out[str(path.relative_to(root))] = (
            stat.S_IFMT(st.st_mode),
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            what,
        )
    return out


async def test_unpack_agrees_with_umoci(service: ImageService, registry: Registry, tmp_path: Path):
    """umoci (an independent unpacker) makes the same tree from the same layers."""
    repo = unique("cross")
    layers = [
        busybox_files(),
        {"etc/motd": b"one", "opt/a/x": b"x", "opt/b/y": b"y", "link": Symlink("etc/motd")},
        {
            "etc/.wh.motd": b"",
            "opt/.wh..wh..opq": b"",
            "opt/c": File(b"c", 0o640, 1, 2),
            "hard": Hardlink("bin/busybox"),
        },
    ]
    await push_image(registry.url, repo, "1", layers=layers)
    ours = (await service.pull(parse_reference(f"{registry.host}/{repo}:1"))).rootfs

    layout, bundle = tmp_path / "layout", tmp_path / "bundle"
    for argv in (
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{registry.host}/{repo}:1", f"oci:{layout}:1"],
        ["umoci", "unpack", "--image", f"{layout}:1", str(bundle)],
    ):
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
        assert proc.returncode == 0, err
    theirs = tree(bundle / "rootfs")
    mine = tree(ours)
    assert set(mine) == set(theirs)
    differing = {p: (mine[p], theirs[p]) for p in mine if mine[p] != theirs[p] and p != "."}
    assert differing == {}


async def test_a_moved_tag_points_to_the_new_image(service: ImageService, registry: Registry):
    repo = unique("moving")
    name = f"{registry.host}/{repo}:stable"
    old_digest = await push_image(registry.url, repo, "stable", {"v": b"1"})
    first = await service.pull(parse_reference(name))
    new_digest = await push_image(registry.url, repo, "stable", {"v": b"2"})
    second = await service.pull(parse_reference(name))
    assert (first.digest, second.digest) == (old_digest, new_digest)
    assert service.present(parse_reference(name)).digest == new_digest
    assert service.index.records[old_digest].tags == []  # untagged: the first to go at GC
    assert (second.rootfs / "v").read_bytes() == b"2"


async def test_a_damaged_local_layer_is_reported_then_fetched_again(service: ImageService, registry: Registry):
    repo = unique("heal")
    await push_image(registry.url, repo, "1", random_files(32 << 10, seed=7), compression="none")
    ref = parse_reference(f"{registry.host}/{repo}:1")
    image = await service.pull(ref)
    layer = service.index.records[image.digest].layers[0]
    stored = service.blobs.path(layer)
    data = bytearray(stored.read_bytes())
    data[2000] ^= 0xFF
    stored.write_bytes(bytes(data))
    shutil.rmtree(image.rootfs)  # as if the unpacked base was lost

    with pytest.raises(PullError, match="does not match diff ID"):
        await service.pull(ref)
    again = await service.pull(ref)
    assert (again.rootfs / "data/random.bin").read_bytes() == random_files(32 << 10, seed=7)["data/random.bin"]


def test_image_users_resolve_against_the_image_files(tmp_path: Path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\napp:x:1000:1000::/app:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\nnobody:x:65534:\napp:x:1000:\nwheel:x:10:app,other\naudio:x:29:app\n")
    assert resolve_user(root, "") == (0, 0, [])
    assert resolve_user(root, None) == (0, 0, [])
    assert resolve_user(root, "nobody") == (65534, 65534, [])
    assert resolve_user(root, "app") == (1000, 1000, [10, 29])
    assert resolve_user(root, "1000") == (1000, 1000, [10, 29])
    assert resolve_user(root, "4242") == (4242, 0, [])  # numeric and unknown: allowed, group root
    assert resolve_user(root, "app:wheel") == (1000, 10, [])
    assert resolve_user(root, "1000:77") == (1000, 77, [])
    with pytest.raises(UnknownUserError, match="unable to find user ghost"):
        resolve_user(root, "ghost")
    with pytest.raises(UnknownUserError, match="unable to find group ghosts"):
        resolve_user(root, "app:ghosts")
    (root / "etc/passwd").unlink()
    (root / "etc/passwd").symlink_to("/etc/shadow")  # resolved inside the image: no host file is read
    assert resolve_user(root, "0") == (0, 0, [])
    with pytest.raises(UnknownUserError):
        resolve_user(root, "root")


async def test_cold_pull_of_a_5mb_image(service: ImageService, registry: Registry):
    payload = random_files(5 << 20, seed=5)
    await push_image(registry.url, "big", "5mb", layers=[busybox_files(), payload], compression="zstd")
    image = await service.pull(parse_reference(f"{registry.host}/big:5mb"))
    assert image.size > 5 << 20
    assert (image.rootfs / "data/random.bin").read_bytes() == payload["data/random.bin"]
    assert 0 < service.disk_usage() < 100  # the real measure GC uses by default
