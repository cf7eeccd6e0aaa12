"""The Docker Registry HTTP API v2 / OCI distribution client: endpoints (mirrors first, then the
registry itself), anonymous, Basic and Bearer-token auth, manifests and verified blob downloads."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from images.auth import Credential, matching_credentials, parse_challenge
from images.errors import ImageNotFoundError, PullError, UnauthorizedError
from images.reference import DEFAULT_DOMAIN, Reference
from images.store import BlobStore, DigestMismatchError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
MAX_MANIFEST_BYTES = 4 << 20
_WRITE_BATCH = 1 << 20
_DOCKER_HUB_API = "registry-1.docker.io"
_TOKEN_DEFAULT_TTL = 60.0


@dataclass(frozen=True)
class Endpoint:
    base: str  # "https://registry.k8s.io" or a mirror's URL
    host: str  # host[:port] of base, for credential matching
    mirror: bool


def _plain_http_host(host: str, insecure: set[str]) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host
    return host in insecure or name in insecure or name in ("localhost", "127.0.0.1", "[::1]")


class RegistryClient:
    def __init__(self, mirrors: dict[str, list[str]], insecure_registries: set[str]) -> None:
        self.mirrors = mirrors
        self.insecure = insecure_registries
        self._session: aiohttp.ClientSession | None = None
        # (endpoint, repository, credential) -> (Authorization header, expiry): keyed by credential so a
        # caller never rides on credentials another Pod's pull secret brought
        self._auth: dict[tuple[str, str, Credential | None], tuple[str, float]] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=None, connect=15, sock_read=60)
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def endpoints(self, ref: Reference) -> list[Endpoint]:
        found = []
        for url in self.mirrors.get(ref.domain, []):
            url = url.rstrip("/")
            found.append(Endpoint(url, url.split("://", 1)[-1].split("/", 1)[0], True))
        host = _DOCKER_HUB_API if ref.domain == DEFAULT_DOMAIN else ref.domain
        scheme = "http" if _plain_http_host(ref.domain, self.insecure) else "https"
        found.append(Endpoint(f"{scheme}://{host}", ref.domain, False))
        return found

    def _candidates(self, ep: Endpoint, ref: Reference, credentials: Sequence[Credential]) -> list[Credential | None]:
        """Credentials to try after a 401: the mirror's own, then the image's (as the kubelet matches them)."""
        found: list[Credential | None] = []
        if ep.mirror:
            found += matching_credentials(credentials, ep.host, ref.path)
        found += [c for c in matching_credentials(credentials, ref.domain, ref.path) if c not in found]
        return found or [None]

    async def _authorize(
        self, ep: Endpoint, ref: Reference, challenge: str, cred: Credential | None
    ) -> tuple[str, float] | None:
        """(Authorization header, expiry) for a 401's challenge, or None when cred cannot answer it."""
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if cred is None:
                return None
            return "Basic " + base64.b64encode(f"{cred.username}:{cred.password}".encode()).decode(), float("inf")
        if scheme != "bearer" or "realm" not in params:
            raise PullError(f"pulling {ref}: {ep.base} asks for unsupported authentication {challenge!r}")
        query = {"scope": params.get("scope") or f"repository:{ref.path}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {}
        if cred is not None and cred.username:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{cred.username}:{cred.password}".encode()).decode()
        try:
            if cred is not None and cred.identity_token:
                form = {"grant_type": "refresh_token", "refresh_token": cred.identity_token, "client_id": "kubelet-emu"}
                form.update(query)
                request = self.session.post(params["realm"], data=form)
            else:
                request = self.session.get(params["realm"], params=query, headers=headers)
            async with request as resp:
                if resp.status in (401, 403):
                    return None
                if resp.status != 200:
                    raise PullError(f"pulling {ref}: token service {params['realm']} answered HTTP {resp.status}")
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PullError(f"pulling {ref}: cannot reach token service {params['realm']}: {exc!r}") from exc
        token = body.get("token") or body.get("access_token")
        if not token:
            raise PullError(f"pulling {ref}: token service {params['realm']} returned no token")
        ttl = float(body.get("expires_in") or _TOKEN_DEFAULT_TTL)
        return f"Bearer {token}", time.monotonic() + max(ttl - 10, 5)

    @contextlib.asynccontextmanager
    async def request(
        self, ep: Endpoint, ref: Reference, path: str, credentials: Sequence[Credential], accept: str = ""
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET base/v2/<repository>/<path>, authenticating on a 401. Yields the response (any status but 401)."""
        url = f"{ep.base}/v2/{ref.path}/{path}"
        headers = {"Accept": accept} if accept else {}
        candidates = self._candidates(ep, ref, credentials)
        for cred in candidates:
            cached = self._auth.get((ep.base, ref.path, cred))
            if cached and cached[1] > time.monotonic():
                headers["Authorization"] = cached[0]
                break
        try:
            resp = await self.session.get(url, headers=headers)
            if resp.status == 401:
                challenge = resp.headers.get("WWW-Authenticate", "")
                resp.release()
                for cred in candidates:
                    auth = await self._authorize(ep, ref, challenge, cred)
                    if auth is None:
                        continue
                    resp = await self.session.get(url, headers={**headers, "Authorization": auth[0]})
                    if resp.status != 401:
                        self._auth[(ep.base, ref.path, cred)] = auth
                        break
                    resp.release()
                else:
                    if any(c is not None for c in candidates):
                        why = "the registry refused the credentials; check the imagePullSecret"
                    else:
                        why = "the repository does not exist or needs credentials, and no imagePullSecret matches"
                    raise UnauthorizedError(f"pulling {ref}: unauthorized at {ep.base}: {why}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PullError(f"pulling {ref}: cannot reach {ep.base}: {exc or type(exc).__name__}") from exc
        try:
            yield resp
        finally:
            resp.release()

    async def manifest(
        self, ep: Endpoint, ref: Reference, locator: str, credentials: Sequence[Credential]
    ) -> tuple[bytes, str, str]:
        """(body, media type, Docker-Content-Digest header or "") of a manifest or index."""
        async with self.request(ep, ref, f"manifests/{locator}", credentials, ACCEPT) as resp:
            if resp.status == 404:
                detail = await _registry_error(resp)
                raise ImageNotFoundError(f"{ref}: not found at {ep.base}: {detail or 'manifest unknown'}")
            if resp.status == 403:
                raise UnauthorizedError(f"pulling {ref}: denied by {ep.base}: {await _registry_error(resp)}")
            if resp.status != 200:
                raise PullError(f"pulling {ref}: {ep.base} answered HTTP {resp.status}: {await _registry_error(resp)}")
            body = await resp.content.read(MAX_MANIFEST_BYTES + 1)
            if len(body) > MAX_MANIFEST_BYTES:
                raise PullError(f"pulling {ref}: manifest {locator} is larger than {MAX_MANIFEST_BYTES} bytes")
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            return body, media_type, resp.headers.get("Docker-Content-Digest", "")

    async def fetch_blob(
        self, ep: Endpoint, ref: Reference, digest: str, size: int | None, store: BlobStore, creds: Sequence[Credential]
    ) -> None:
        """Download a blob into the store; its digest and size are checked before it is kept."""
        async with self.request(ep, ref, f"blobs/{digest}", creds) as resp:
            if resp.status == 404:
                raise ImageNotFoundError(f"pulling {ref}: blob {digest} not found at {ep.base}")
            if resp.status != 200:
                raise PullError(f"pulling {ref}: blob {digest}: {ep.base} answered HTTP {resp.status}")
            writer = await asyncio.to_thread(store.writer, digest, size)
            try:
                batch = bytearray()
                async for chunk in resp.content.iter_chunked(256 << 10):
                    batch += chunk
                    if size is not None and writer.written + len(batch) > size:
                        raise DigestMismatchError(f"blob {digest} is larger than the {size} bytes the manifest says")
                    if len(batch) >= _WRITE_BATCH:
                        await asyncio.to_thread(writer.write, bytes(batch))
                        batch.clear()
                if batch:
                    await asyncio.to_thread(writer.write, bytes(batch))
                await asyncio.to_thread(writer.commit)
            except DigestMismatchError as exc:
                await asyncio.to_thread(writer.abort)
                raise PullError(f"pulling {ref}: layer {digest} from {ep.base}: {exc}") from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                await asyncio.to_thread(writer.abort)
                raise PullError(f"pulling {ref}: download of {digest} from {ep.base} failed: {exc}") from exc
            except BaseException:
                await asyncio.to_thread(writer.abort)
                raise


async def _registry_error(resp: aiohttp.ClientResponse) -> str:
    """The message of a registry's JSON error body ({"errors": [{"code", "message"}]})."""
    try:
        body: Any = await resp.json(content_type=None)
        errors = body.get("errors") or []
        return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors) or ""
    except (ValueError, aiohttp.ClientError, AttributeError):
        return ""
