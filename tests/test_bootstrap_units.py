"""The pieces of join/bootstrap/rotation that need no cluster: the DER reader, the rotation
deadline, the files the kubelet keeps, and the key/CSR child."""

from __future__ import annotations

import datetime as dt
import os
import random
import stat

import pytest

from agent.bootstrap import certinfo, csr_client, rotation
from agent.bootstrap.keygen import new_key_and_csr


def _cert(not_before: dt.datetime, not_after: dt.datetime, cn: str = "system:node:a"):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
                         x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # fmt: skip
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "the-ca")])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
        .serial_number(0xABCDEF).not_valid_before(not_before).not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, spki


def test_certinfo_reads_what_cryptography_wrote():
    nb = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    na = dt.datetime(2051, 6, 7, 8, 9, 10, tzinfo=dt.UTC)  # GeneralizedTime after 2049
    pem, _, spki = _cert(nb, na)
    info = certinfo.first_certificate(pem)
    assert (info.not_before, info.not_after) == (nb.timestamp(), na.timestamp())
    assert info.subject_cn == "system:node:a" and info.subject_orgs == ("system:nodes",)
    assert info.issuer_cn == "the-ca" and info.serial == 0xABCDEF
    assert info.spki == spki
    with pytest.raises(certinfo.CertError):
        certinfo.first_certificate(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_rotation_deadline_is_70_to_90_percent_of_the_lifetime():
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)  # certificates keep whole seconds
    info = certinfo.first_certificate(_cert(now, now + dt.timedelta(days=10))[0])
    rng = random.Random(1)
    for _ in range(200):
        fraction = (rotation.rotation_deadline(info, rng=rng) - info.not_before) / (10 * 86400)
        assert 0.7 <= fraction <= 0.9
    # The CSR signer backdates notBefore 5 minutes: a 1-minute certificate counts from its issuance.
    backdated = certinfo.first_certificate(_cert(now - dt.timedelta(minutes=5), now + dt.timedelta(minutes=1))[0])
    for _ in range(200):
        deadline = rotation.rotation_deadline(backdated, issued=now.timestamp(), rng=rng)
        assert now.timestamp() + 42 <= deadline <= now.timestamp() + 54


def test_store_writes_private_files_and_moves_the_current_link(tmp_path):
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)  # certificates keep whole seconds
    first = csr_client.store(tmp_path, *_cert(now, now + dt.timedelta(hours=1))[:2])
    second = csr_client.store(tmp_path, *_cert(now, now + dt.timedelta(hours=2))[:2])
    assert first != second and first.name.startswith("kubelet-client-")
    link = tmp_path / csr_client.CURRENT
    assert link.is_symlink() and os.readlink(link) == second.name
    assert csr_client.current_file(tmp_path) == second
    for path in (first, second):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert b"PRIVATE KEY" in path.read_bytes() and b"CERTIFICATE" in path.read_bytes()
    third = csr_client.store(tmp_path, *_cert(now, now + dt.timedelta(hours=3))[:2])
    csr_client.prune(tmp_path, {third, second})
    assert not first.exists() and second.exists() and third.exists() and link.exists()


async def test_key_and_csr_come_from_a_child_and_name_the_node():
    from cryptography import x509

    key_pem, csr_pem = await new_key_and_csr("node-x")
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "CN=system:node:node-x,O=system:nodes"
    assert not list(csr.extensions)  # a client certificate names no hosts
    assert b"PRIVATE KEY" in key_pem
