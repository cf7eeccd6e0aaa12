"""The serving certificate and the TLS context of the kubelet API.

Without configured files the agent makes a self-signed certificate for the node's names and IPs at
first start, as the kubelet does (<state>/pki/kubelet.crt, key 0600), reuses it on restart, and
makes a new one when the names or IPs changed or it expires within 30 days. A small JSON note
beside it records what it covers, so a restart need not import `cryptography` to check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.logfmt import kv

log = logging.getLogger(__name__)

VALIDITY_DAYS = 365
RENEW_BEFORE = 30 * 86400  # seconds before expiry a self-signed certificate is replaced


class TLSConfigError(Exception):
    """The certificate, key or client CA cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class ServingNames:
    dns: tuple[str, ...]
    ips: tuple[str, ...]

    @classmethod
    def of(cls, *names: str) -> ServingNames:
        dns: list[str] = []
        ips: list[str] = []
        for name in names:
            if not name:
                continue
            try:
                ips.append(str(ipaddress.ip_address(name)))
            except ValueError:
                dns.append(name.lower())
        return cls(tuple(sorted(set(dns))), tuple(sorted(set(ips))))


async def self_signed(pki_dir: Path, names: ServingNames) -> tuple[Path, Path]:
    """The certificate and key files, made or reused; regenerated when stale."""
    cert, key, note = pki_dir / "kubelet.crt", pki_dir / "kubelet.key", pki_dir / "kubelet.json"
    try:
        meta = json.loads(note.read_text())
        current = (
            cert.is_file()
            and key.is_file()
            and meta.get("dns") == list(names.dns)
            and meta.get("ips") == list(names.ips)
            and float(meta.get("not_after", 0)) - time.time() > RENEW_BEFORE
        )
    except (OSError, ValueError, TypeError):
        current = False
    if current:
        return cert, key
    not_after = await _generate_in_child(pki_dir, names)
    note.write_text(json.dumps({"dns": list(names.dns), "ips": list(names.ips), "not_after": not_after}))
    log.info("made a self-signed serving certificate", extra=kv(file=str(cert), dns=",".join(names.dns)))
    return cert, key


async def _generate_in_child(pki_dir: Path, names: ServingNames) -> float:
    """A short-lived child makes the pair: importing cryptography would cost the agent ~7 MiB for good."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    spec = json.dumps({"dns": list(names.dns), "ips": list(names.ips)})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.kubelet_api.tls", str(pki_dir), spec,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        text = err.decode(errors="replace").strip()
        if "No module named 'cryptography'" in text:
            raise TLSConfigError("the Python package cryptography is missing: pip install cryptography")
        raise OSError(f"making the self-signed certificate failed: {text[-300:]}")
    return float(out.decode().strip())


def _generate(cert_path: Path, key_path: Path, names: ServingNames) -> float:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    # The kubelet names its self-signed certificate <hostname>@<unix time>.
    common_name = f"{(names.dns or ('kubelet',))[0]}@{int(time.time())}"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    alt = [x509.DNSName(n) for n in names.dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in names.ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            _key_usage(x509),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    certificate = builder.sign(key, hashes.SHA256())
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = key_path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    os.replace(tmp, key_path)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return (now + dt.timedelta(days=VALIDITY_DAYS)).timestamp()


def _key_usage(x509: Any) -> Any:
    flags = dict.fromkeys(
        ("content_commitment", "data_encipherment", "key_agreement", "crl_sign", "encipher_only", "decipher_only"),
        False,
    )
    return x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=True, **flags)


def server_context(cert: Path | str, key: Path | str, client_ca: bytes | None) -> ssl.SSLContext:
    """TLS 1.2+; client certificates are asked for and checked against `client_ca` when given,
    but optional, so bearer tokens (and anonymous requests, if allowed) still get through."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(
            f"cannot load the serving certificate {cert} with key {key}: {exc}; "
            "fix [kubelet_api] tls_cert_file/tls_key_file or remove them for a self-signed one"
        ) from exc
    if client_ca:
        try:
            ctx.load_verify_locations(cadata=client_ca.decode())
        except (ssl.SSLError, ValueError) as exc:
            raise TLSConfigError(f"cannot load the client CA: {exc}; fix [kubelet_api] client_ca_file") from exc
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def main(argv: list[str]) -> int:
    """python -m agent.kubelet_api.tls PKI_DIR '{"dns": [...], "ips": [...]}': make the pair, print not_after."""
    pki_dir, spec = Path(argv[0]), json.loads(argv[1])
    names = ServingNames(tuple(spec["dns"]), tuple(spec["ips"]))
    print(_generate(pki_dir / "kubelet.crt", pki_dir / "kubelet.key", names))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
