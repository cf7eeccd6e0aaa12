"""Unit tests for agent.image_pull's pure rules: the default pull policy, Go's duration text in
the Pulled event, and reading imagePullSecrets."""

from __future__ import annotations

import base64
import json

import pytest

from agent.image_pull import default_pull_policy, docker_config_from_secret, go_duration


@pytest.mark.parametrize(
    ("image", "policy"),
    [
        ("busybox", "Always"),
        ("busybox:latest", "Always"),
        ("127.0.0.1:5000/busybox", "Always"),  # the port is not a tag
        ("127.0.0.1:5000/busybox:1.36", "IfNotPresent"),
        ("busybox@sha256:" + "a" * 64, "IfNotPresent"),
        ("busybox:latest@sha256:" + "a" * 64, "IfNotPresent"),
    ],
)
def test_default_pull_policy(image: str, policy: str) -> None:
    assert default_pull_policy(image) == policy


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0004, "0ms"), (0.812, "812ms"), (1.0, "1s"), (1.2345, "1.234s"), (12.5, "12.5s"), (75.25, "1m15.25s")],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def _b64(obj: object) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def test_dockerconfigjson_and_dockercfg_secrets() -> None:
    auths = {"127.0.0.1:5000": {"auth": base64.b64encode(b"u:p").decode()}}
    assert docker_config_from_secret({"data": {".dockerconfigjson": _b64({"auths": auths})}}) == {"auths": auths}
    assert docker_config_from_secret({"data": {".dockercfg": _b64(auths)}}) == {"auths": auths}


@pytest.mark.parametrize("data", [{}, {"other": "eA=="}, {".dockerconfigjson": "not base64!"}, {".dockercfg": "e30x"}])
def test_unusable_pull_secrets_are_skipped(data: dict) -> None:
    assert docker_config_from_secret({"data": data}) is None
