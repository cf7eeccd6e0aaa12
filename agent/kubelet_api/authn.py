"""Who is asking: x509 client certificates, then bearer tokens through TokenReview, then anonymous.

As the kubelet's delegating authenticator (k8s.io/apiserver authenticatorfactory, kubelet defaults of
v1.36): a verified client certificate gives user = CN and groups = O; a bearer token is checked by
the API server with a TokenReview and the answer, yes or no, is cached for 2 minutes (the kubelet's
authentication.webhook.cacheTTL, used for both); with neither, the request is anonymous
(system:anonymous, group system:unauthenticated) when that is enabled and unauthorized otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.kube import ApiError, Kube
from common.logfmt import kv

log = logging.getLogger(__name__)

TOKEN_CACHE_TTL = 120.0
TOKEN_CACHE_MAX = 4096  # entries; the oldest half goes when full

ANONYMOUS = "system:anonymous"
UNAUTHENTICATED = "system:unauthenticated"
AUTHENTICATED = "system:authenticated"


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: Mapping[str, list[str]] = field(default_factory=dict, hash=False)


class AuthenticationError(Exception):
    """The credentials could not be checked (the API server did not answer): 401, not cached."""


def user_from_peercert(peercert: Mapping[str, Any] | None) -> User | None:
    """CN is the user, each O a group, as the x509 request authenticator reads a verified cert."""
    if not peercert:
        return None
    cn = ""
    orgs: list[str] = []
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = value
            elif key == "organizationName":
                orgs.append(value)
    if not cn:
        return None
    return User(cn, (*orgs, AUTHENTICATED) if AUTHENTICATED not in orgs else tuple(orgs))


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Authenticator:
    def __init__(self, kube: Kube, anonymous: bool, cache_ttl: float = TOKEN_CACHE_TTL):
        self.kube = kube
        self.anonymous = anonymous
        self.cache_ttl = cache_ttl
        self._tokens: dict[bytes, tuple[float, User | None]] = {}  # sha256(token) -> (expiry, user)
        self.token_reviews = 0  # TokenReviews sent, for tests and stats

    async def authenticate(self, peercert: Mapping[str, Any] | None, authorization: str | None) -> User | None:
        """The user, or None for 401. Raises AuthenticationError when a token could not be checked."""
        user = user_from_peercert(peercert)
        if user is not None:
            return user
        token = bearer_token(authorization)
        if token is not None:
            return await self._review(token)
        if self.anonymous and not authorization:
            return User(ANONYMOUS, (UNAUTHENTICATED,))
        return None

    async def _review(self, token: str) -> User | None:
        key = hashlib.sha256(token.encode()).digest()  # no token is kept in memory
        now = time.monotonic()
        hit = self._tokens.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
        self.token_reviews += 1
        try:
            answer = await self.kube.create("/apis/authentication.k8s.io/v1/tokenreviews", body)
        except ApiError as exc:
            if exc.forbidden:
                log.error(
                    "cannot check bearer tokens: the node identity may not create TokenReviews; grant "
                    "`create` on tokenreviews.authentication.k8s.io (the system:node rules of the Node "
                    "authorizer or RBAC role system:node include it)",
                    extra=kv(error=exc.describe()),
                )
            else:
                log.warning("token review failed", extra=kv(error=exc.describe()))
            raise AuthenticationError(exc.describe()) from exc
        status = answer.get("status") or {}
        user: User | None = None
        if status.get("authenticated"):
            info = status.get("user") or {}
            user = User(
                name=info.get("username", ""),
                groups=tuple(info.get("groups") or ()),
                uid=info.get("uid", ""),
                extra=dict(info.get("extra") or {}),
            )
        if len(self._tokens) >= TOKEN_CACHE_MAX:
            for old in list(self._tokens)[: TOKEN_CACHE_MAX // 2]:
                del self._tokens[old]
        self._tokens[key] = (now + self.cache_ttl, user)
        return user
