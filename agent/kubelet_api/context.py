"""What every route module of the kubelet API gets: a read-only view of the running agent.

Route modules expose `add_routes(app, ctx)`; the server (server.py) owns TLS, authentication
and authorization, so a route handler only deals with its own path and query.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.kube import Kube
    from agent.pod_worker import PodWorker
    from agent.pods import PodController


@dataclass
class KubeletAPIContext:
    node_name: str
    controller: PodController  # .workers: uid -> PodWorker (.pod, .backend, .sandbox, .handles)
    kube: Kube  # TokenReview / SubjectAccessReview go through the agent's own client
    config: AgentConfig
    state_dir: Path

    @property
    def pods_dir(self) -> Path:
        """Per-Pod directories (<ns>_<name>_<uid>) with the containers' CRI logs."""
        return self.state_dir / "pods"

    def find_pod(self, namespace: str, name: str) -> PodWorker | None:
        return find_pod(self.controller, namespace, name)


def find_pod(controller: PodController, namespace: str, name: str) -> PodWorker | None:
    """The worker of the Pod `namespace`/`name` among the controller's, unless it is gone."""
    key = f"{namespace}/{name}"
    for worker in controller.workers.values():
        if worker.key == key and not worker.gone:
            return worker
    return None
