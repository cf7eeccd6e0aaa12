"""What the agent needs to know about an X.509 certificate, read from its DER without `cryptography`:
validity, serial, subject CN and issuer CN, and the SubjectPublicKeyInfo (whose sha256 is
kubeadm's --discovery-token-ca-cert-hash)."""

from __future__ import annotations

import base64
import calendar
import hashlib
import re
import time
from dataclasses import dataclass

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.S)
_CN_OID = bytes.fromhex("550403")  # 2.5.4.3


class CertError(ValueError):
    """Not a certificate this reader understands."""


@dataclass(frozen=True)
class CertInfo:
    serial: int
    issuer_cn: str
    subject_cn: str
    subject_orgs: tuple[str, ...]
    not_before: float  # Unix time
    not_after: float
    spki: bytes  # DER SubjectPublicKeyInfo

    @property
    def spki_sha256(self) -> str:
        return "sha256:" + hashlib.sha256(self.spki).hexdigest()

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) >= self.not_after


def pem_certificates(pem: bytes) -> list[bytes]:
    """The DER of each CERTIFICATE block, in order."""
    return [base64.b64decode(b"".join(m.split())) for m in _PEM_CERT.findall(pem)]


def _tlv(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the element at `pos`."""
    if pos + 2 > len(buf):
        raise CertError("truncated DER")
    tag, length = buf[pos], buf[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(buf):
            raise CertError("bad DER length")
        length = int.from_bytes(buf[pos : pos + n], "big")
        pos += n
    if pos + length > len(buf):
        raise CertError("truncated DER")
    return tag, pos, pos + length


def _children(buf: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, element start, content start, content end) of each element in [start, end)."""
    out = []
    pos = start
    while pos < end:
        tag, cs, ce = _tlv(buf, pos)
        out.append((tag, pos, cs, ce))
        pos = ce
    return out


def _time(buf: bytes, tag: int, cs: int, ce: int) -> float:
    text = buf[cs:ce].decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise CertError("bad time in validity")
    parsed = time.strptime(text.rstrip("Z"), "%Y%m%d%H%M%S")
    return float(calendar.timegm(parsed))


def _name(buf: bytes, cs: int, ce: int) -> tuple[str, tuple[str, ...]]:
    """(CN, O values) of an X.501 Name."""
    cn, orgs = "", []
    for _, _, scs, sce in _children(buf, cs, ce):  # SET
        for _, _, acs, ace in _children(buf, scs, sce):  # SEQUENCE {OID, value}
            parts = _children(buf, acs, ace)
            if len(parts) != 2:
                continue
            oid = buf[parts[0][2] : parts[0][3]]
            value = buf[parts[1][2] : parts[1][3]].decode("utf-8", "replace")
            if oid == _CN_OID:
                cn = value
            elif oid == bytes.fromhex("55040a"):  # 2.5.4.10 organizationName
                orgs.append(value)
    return cn, tuple(orgs)


def parse(der: bytes) -> CertInfo:
    try:
        _, cs, ce = _tlv(der, 0)
        _, _, tcs, tce = _children(der, cs, ce)[0]
        fields = _children(der, tcs, tce)
        if fields and fields[0][0] == 0xA0:  # [0] version
            fields = fields[1:]
        serial_f, _sig, issuer_f, validity_f, subject_f, spki_f = fields[:6]
        validity = _children(der, validity_f[2], validity_f[3])
        not_before = _time(der, validity[0][0], validity[0][2], validity[0][3])
        not_after = _time(der, validity[1][0], validity[1][2], validity[1][3])
        issuer_cn, _ = _name(der, issuer_f[2], issuer_f[3])
        subject_cn, orgs = _name(der, subject_f[2], subject_f[3])
        return CertInfo(
            serial=int.from_bytes(der[serial_f[2] : serial_f[3]], "big"),
            issuer_cn=issuer_cn,
            subject_cn=subject_cn,
            subject_orgs=orgs,
            not_before=not_before,
            not_after=not_after,
            spki=der[spki_f[1] : spki_f[3]],
        )
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, CertError):
            raise
        raise CertError(f"not an X.509 certificate: {exc}") from exc


def first_certificate(pem: bytes) -> CertInfo:
    certs = pem_certificates(pem)
    if not certs:
        raise CertError("no CERTIFICATE block")
    return parse(certs[0])
