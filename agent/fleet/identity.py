"""Who the fleet's credential is: a node identity cannot serve many nodes (NodeRestriction), and an
admin credential is refused unless asked for."""

from __future__ import annotations

import logging

from agent.kube import ApiError, Kube
from common.logfmt import kv

log = logging.getLogger(__name__)

REVIEW = "/apis/authentication.k8s.io/v1/selfsubjectreviews"
MINT_HINT = "mint one with `kubelet-emu dev-cluster fleet-kubeconfig` or bind examples/fleet/rbac.yaml to yours"


class IdentityError(Exception):
    pass


def judge(username: str, groups: list[str], allow_admin: bool) -> str | None:
    """The reason the identity cannot run a fleet, or None."""
    if username.startswith("system:node:") or "system:nodes" in groups:
        return (
            f"the kubeconfig is node identity {username!r}: NodeRestriction lets a node change only its own "
            f"Node, Lease and Pods, so it cannot run a fleet; {MINT_HINT}"
        )
    if "system:masters" in groups and not allow_admin:
        return (
            f"the kubeconfig is an admin credential ({username!r}, group system:masters): refused, a fleet "
            f"needs only the rights of examples/fleet/rbac.yaml; {MINT_HINT}, or pass --allow-admin"
        )
    return None


async def check_identity(kube: Kube, allow_admin: bool) -> None:
    """Raises IdentityError when the credential must not run a fleet (SelfSubjectReview, which every
    authenticated user may create)."""
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    try:
        review = await kube.create(REVIEW, body)
    except ApiError as exc:
        log.warning("cannot tell who the credential is; not checked", extra=kv(error=exc.describe()))
        return
    info = review.get("status", {}).get("userInfo", {})
    username, groups = info.get("username", ""), info.get("groups") or []
    reason = judge(username, groups, allow_admin)
    if reason:
        raise IdentityError(reason)
    log.info("fleet credential", extra=kv(user=username, groups=",".join(groups)))
