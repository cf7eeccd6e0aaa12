"""A local registry for tests, the demo and benchmarks: Debian's docker-registry (distribution 2.8)
on 127.0.0.1, with optional htpasswd (Basic) or token (Bearer) authentication.

htpasswd entries must be bcrypt hashes, made with the `bcrypt` package.
Token auth runs a small token issuer here that signs RS256 JWTs with an openssl-made key."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp
from aiohttp import web

from images.store import digest_hex

REGISTRY_BINARY = "/usr/bin/docker-registry"
TOKEN_SERVICE = "kubelet-emu-registry"
TOKEN_ISSUER = "kubelet-emu-token-issuer"
START_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bcrypt_hash(password: str) -> str:
    import bcrypt  # only the htpasswd registries of the tests need it

    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(spki_der: bytes) -> str:
    """The key ID docker-registry derives from a certificate's public key (libtrust's format)."""
    encoded = base64.b32encode(hashlib.sha256(spki_der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


async def _run(*argv: str, stdin: bytes | None = None) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate(stdin)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {err.decode().strip()}")
    return out


class TokenIssuer:
    """The registry's token service: checks Basic credentials and signs a JWT for the asked scope."""

    def __init__(self, directory: Path, users: dict[str, str]) -> None:
        self.key = directory / "token.key"
        self.cert = directory / "token.crt"
        self.users = users
        self.kid = ""
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.issued = 0

    async def start(self) -> None:
        await _run(
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=kubelet-emu token issuer", "-keyout", str(self.key), "-out", str(self.cert),
        )  # fmt: skip
        spki = await _run("openssl", "pkey", "-in", str(self.key), "-pubout", "-outform", "DER")
        self.kid = libtrust_key_id(spki)
        app = web.Application()
        app.router.add_get("/token", self.token)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/token"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def _user(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        with contextlib.suppress(ValueError):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(user) == password:
                return user
        return None

    async def token(self, request: web.Request) -> web.Response:
        user = self._user(request)
        if user is None:
            return web.json_response({"details": "bad or missing credentials"}, status=401)
        access = []
        for scope in request.query.getall("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": user,
            "aud": request.query.get("service", TOKEN_SERVICE),
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = await _run("openssl", "dgst", "-sha256", "-sign", str(self.key), stdin=signing_input.encode())
        self.issued += 1
        token = f"{signing_input}.{_b64url(signature)}"
        return web.json_response({"token": token, "access_token": token, "expires_in": 300})


@dataclass
class Registry:
    url: str  # http://127.0.0.1:PORT
    directory: Path
    process: asyncio.subprocess.Process
    token_issuer: TokenIssuer | None = None
    users: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        """host:port, as image names write it: f"{registry.host}/busybox:1"."""
        return self.url.split("://", 1)[1]

    @property
    def storage(self) -> Path:
        return self.directory / "storage"

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (to corrupt one in a test)."""
        hex_part = digest_hex(digest)
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_part[:2] / hex_part / "data"

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self.token_issuer is not None:
            await self.token_issuer.stop()


def _config_yaml(directory: Path, port: int, auth_block: str) -> str:
    return f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {directory / "storage"}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: {secrets.token_hex(16)}
{auth_block}"""


async def start_registry(
    directory: Path,
    port: int = 0,
    users: dict[str, str] | None = None,
    auth: Literal["none", "basic", "token"] | None = None,
) -> Registry:
    """Start docker-registry storing under directory; answers on http://127.0.0.1:PORT once this returns.
    With users, auth defaults to "basic" (htpasswd); "token" runs a token issuer as well."""
    if not os.access(REGISTRY_BINARY, os.X_OK):
        raise FileNotFoundError(f"{REGISTRY_BINARY} is missing: apt-get install docker-registry")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    users = dict(users or {})
    auth = auth or ("basic" if users else "none")
    port = port or free_port()
    issuer = None
    auth_block = ""
    if auth == "basic":
        htpasswd = directory / "htpasswd"
        htpasswd.write_text("".join(f"{u}:{bcrypt_hash(p)}\n" for u, p in users.items()))
        auth_block = f"auth:\n  htpasswd:\n    realm: kubelet-emu\n    path: {htpasswd}\n"
    elif auth == "token":
        issuer = TokenIssuer(directory, users)
        await issuer.start()
        auth_block = (
            f"auth:\n  token:\n    realm: {issuer.url}\n    service: {TOKEN_SERVICE}\n"
            f"    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {issuer.cert}\n"
        )
    config = directory / "config.yml"
    config.write_text(_config_yaml(directory, port, auth_block))
    log_file = open(directory / "registry.log", "ab")  # noqa: SIM115 - the child keeps writing to it
    try:
        process = await asyncio.create_subprocess_exec(
            REGISTRY_BINARY, "serve", str(config), stdout=log_file, stderr=log_file, stdin=asyncio.subprocess.DEVNULL
        )
    finally:
        log_file.close()
    registry = Registry(f"http://127.0.0.1:{port}", directory, process, issuer, users)
    deadline = time.monotonic() + START_TIMEOUT
    async with aiohttp.ClientSession() as session:
        while True:
            if process.returncode is not None:
                await registry.stop()
                log = (directory / "registry.log").read_text()[-2000:]
                raise RuntimeError(f"docker-registry exited with {process.returncode}: {log}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(f"{registry.url}/v2/") as resp:
                    if resp.status in (200, 401):
                        return registry
            if time.monotonic() > deadline:
                await registry.stop()
                raise TimeoutError(f"docker-registry on {registry.url} did not answer /v2/ in {START_TIMEOUT:.0f}s")
            await asyncio.sleep(0.05)


async def serve(directory: Path, port: int) -> None:
    """Run a registry with busybox:latest and big:5mb (5 MiB of random bytes over busybox) until stopped."""
    from images.build import BUSYBOX_PATH, busybox_files, push_image, random_files

    registry = await start_registry(directory, port)
    try:
        config = {"Cmd": ["sh"], "Env": [f"PATH={BUSYBOX_PATH}"]}
        await push_image(registry.url, "busybox", "latest", busybox_files(), config=config)
        await push_image(registry.url, "big", "5mb", layers=[busybox_files(), random_files(5 << 20)], config=config)
        print(f"registry on {registry.url}: {registry.host}/busybox:latest, {registry.host}/big:5mb", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await registry.stop()


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="A local docker-registry with a busybox image in it")
    parser.add_argument("directory", type=Path, help="where the registry stores blobs")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.directory, args.port))


if __name__ == "__main__":
    main()
