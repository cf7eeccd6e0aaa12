"""A real docker-registry on 127.0.0.1 for the whole test session, and a busybox image in it.
Use it from a test module or conftest.py with `pytest_plugins = ["registry_fixture"]` (one registry
per session however many modules name it)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from images.build import BUSYBOX_PATH, busybox_files, push_image
from images.local_registry import Registry, start_registry

BUSYBOX_CONFIG = {"Entrypoint": None, "Cmd": ["sh"], "Env": [f"PATH={BUSYBOX_PATH}"], "WorkingDir": "/"}


@pytest.fixture(scope="session")
async def registry(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Registry]:
    """An anonymous registry (no auth) that tests push images to with images.build.push_image."""
    reg = await start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    await reg.stop()


@pytest.fixture(scope="session")
async def busybox_ref(registry: Registry) -> str:
    """'127.0.0.1:PORT/busybox:1': the static busybox with applet links, /etc/passwd and /etc/group."""
    await push_image(registry.url, "busybox", "1", busybox_files(), config=BUSYBOX_CONFIG)
    return f"{registry.host}/busybox:1"
