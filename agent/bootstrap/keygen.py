"""A new ECDSA P-256 key and a CSR for a node's client certificate, made in a short-lived child.

`cryptography` costs the resident agent ~7 MiB for good (see agent/kubelet_api/tls.py), so the
agent runs `python -m agent.bootstrap.keygen NODE`, which prints {"key": PEM, "csr": PEM} on its
stdout pipe: the key never leaves the host and never touches a file other than the agent's own.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path


class KeygenError(Exception):
    pass


async def new_key_and_csr(node_name: str) -> tuple[bytes, bytes]:
    """(key PEM, CSR PEM): CN system:node:<name>, O system:nodes, no SANs."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.bootstrap.keygen", node_name,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        text = err.decode(errors="replace").strip()
        if "No module named 'cryptography'" in text:
            raise KeygenError("the Python package cryptography is missing: pip install cryptography")
        raise KeygenError(f"making the client key and CSR failed: {text[-300:]}")
    doc = json.loads(out)
    return doc["key"].encode(), doc["csr"].encode()


def main(argv: list[str]) -> int:
    from agent.kubelet_api.csr import make_request
    from agent.kubelet_api.tls import ServingNames

    key_pem, csr_pem = make_request(argv[0], ServingNames((), ()))
    print(json.dumps({"key": key_pem.decode(), "csr": csr_pem.decode()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
