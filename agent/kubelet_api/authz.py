"""May this user do this: SubjectAccessReviews on nodes/<subresource>, as the kubelet's Webhook mode.

Answers are cached like the kubelet's defaults (authorization.webhook cacheAuthorizedTTL 5 minutes,
cacheUnauthorizedTTL 30 seconds). Mode "AlwaysAllow" lets every authenticated request through.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from agent.kube import ApiError, Kube
from agent.kubelet_api.authn import User
from agent.kubelet_api.paths import subresources, verb
from common.logfmt import kv

log = logging.getLogger(__name__)

ALLOW_TTL = 300.0
DENY_TTL = 30.0
CACHE_MAX = 4096


class AuthorizationError(Exception):
    """The API server could not be asked: the kubelet answers 500 with its own text."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    message: str  # the response body when not allowed, in the kubelet's words


class Authorizer:
    def __init__(self, kube: Kube, node_name: str, mode: str = "Webhook"):
        self.kube = kube
        self.node_name = node_name
        self.mode = mode
        self._cache: dict[tuple[Any, ...], tuple[float, bool]] = {}
        self.reviews = 0  # SubjectAccessReviews sent

    async def authorize(self, user: User, method: str, path: str) -> Decision:
        api_verb, subs = verb(method), subresources(path)
        if self.mode == "AlwaysAllow":
            return Decision(True, "")
        for sub in subs:  # allowed when any of them is
            try:
                if await self._allowed(user, api_verb, sub):
                    return Decision(True, "")
            except ApiError as exc:
                fields = kv(user=user.name, verb=api_verb, subresource=sub, error=exc.describe())
                log.warning("authorization error", extra=fields)
                raise AuthorizationError(
                    f"Authorization error (user={user.name}, verb={api_verb}, resource=nodes, subresource={sub})"
                ) from exc
        log.debug("forbidden", extra=kv(user=user.name, verb=api_verb, subresources=",".join(subs)))
        listed = " ".join(subs)
        return Decision(
            False, f"Forbidden (user={user.name}, verb={api_verb}, resource=nodes, subresource(s)=[{listed}])\n"
        )

    async def _allowed(self, user: User, api_verb: str, sub: str) -> bool:
        extra = tuple(sorted((k, tuple(v)) for k, v in user.extra.items()))
        key = (user.name, user.uid, user.groups, extra, api_verb, sub)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        spec: dict[str, Any] = {
            "user": user.name,
            "groups": list(user.groups),
            "resourceAttributes": {
                "verb": api_verb,
                "group": "",
                "version": "v1",
                "resource": "nodes",
                "subresource": sub,
                "name": self.node_name,
            },
        }
        if user.uid:
            spec["uid"] = user.uid
        if user.extra:
            spec["extra"] = {k: list(v) for k, v in user.extra.items()}
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}
        self.reviews += 1
        try:
            answer = await self.kube.create("/apis/authorization.k8s.io/v1/subjectaccessreviews", body)
        except ApiError as exc:
            if exc.forbidden:
                log.error(
                    "cannot authorize kubelet API requests: the node identity may not create "
                    "SubjectAccessReviews; grant `create` on subjectaccessreviews.authorization.k8s.io "
                    "(the Node authorizer's system:node rules include it) or set "
                    '[kubelet_api] authorization_mode = "AlwaysAllow"',
                    extra=kv(error=exc.describe()),
                )
            raise
        allowed = bool((answer.get("status") or {}).get("allowed"))
        if len(self._cache) >= CACHE_MAX:
            for old in list(self._cache)[: CACHE_MAX // 2]:
                del self._cache[old]
        self._cache[key] = (now + (ALLOW_TTL if allowed else DENY_TTL), allowed)
        return allowed
