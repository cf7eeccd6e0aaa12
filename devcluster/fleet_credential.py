"""A credential for `kubelet-emu fleet` on the dev cluster: a client certificate for the group
kubelet-emu:fleets, signed by the cluster CA, with examples/fleet/rbac.yaml applied so that group
has exactly what a fleet uses. Never system:masters, never a node identity."""

from __future__ import annotations

import asyncio
import datetime
import os
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devcluster.manage import Cluster, DevClusterError, kubectl_argv

FLEET_GROUP = "kubelet-emu:fleets"
RBAC_FILE = Path(__file__).resolve().parent.parent / "examples" / "fleet" / "rbac.yaml"
VALIDITY = datetime.timedelta(days=365)


def _issue(pki: Path, user: str) -> tuple[Path, Path]:
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, FLEET_GROUP),
                         x509.NameAttribute(NameOID.COMMON_NAME, user)])  # fmt: skip
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    name = user.replace(":", "-")
    cert_path, key_path = pki / f"{name}.crt", pki / f"{name}.key"
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the key is a secret
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


async def fleet_kubeconfig(cluster: Cluster, name: str = "fleet") -> Path:
    """Apply the fleet's RBAC, mint its certificate, write its kubeconfig (0600); returns the path."""
    argv, env = kubectl_argv(cluster, ["apply", "-f", str(RBAC_FILE)])
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise DevClusterError(f"cannot apply {RBAC_FILE}: {err.decode(errors='replace').strip()}")
    user = f"kubelet-emu:fleet:{name}"
    cert, key = await asyncio.to_thread(_issue, cluster.dir / "pki", user)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "devcluster", "cluster": {"server": cluster.server,
                                                        "certificate-authority": str(cluster.ca_cert)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "devcluster", "context": {"cluster": "devcluster", "user": user}}],
        "current-context": "devcluster",
    }  # fmt: skip
    path = cluster.dir / "fleets" / f"{name}.kubeconfig"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f)
    return path
