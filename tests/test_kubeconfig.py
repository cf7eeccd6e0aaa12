"""Unit tests of the agent's own kubeconfig reader (files and inline data, tokens, errors)."""

from __future__ import annotations

import base64
import ssl
import subprocess
from pathlib import Path

import pytest

from agent.kubeconfig import KubeconfigError, NeedsPlugin, load


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=system:node:n1/O=system:nodes", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    return d


def kubeconfig(tmp_path: Path, cluster: str, user: str, current: str = "ctx") -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        f"""apiVersion: v1
kind: Config
current-context: {current}
contexts:
- name: ctx
  context: {{cluster: c, user: u}}
clusters:
- name: c
  cluster:
{cluster}
users:
- name: u
  user:
{user}
"""
    )
    return path


def test_certificate_files_relative_to_the_kubeconfig(tmp_path, pki):
    (tmp_path / "ca.pem").write_bytes((pki / "cert.pem").read_bytes())
    (tmp_path / "c.pem").write_bytes((pki / "cert.pem").read_bytes())
    (tmp_path / "k.pem").write_bytes((pki / "key.pem").read_bytes())
    path = kubeconfig(tmp_path, "    server: https://127.0.0.1:6443\n    certificate-authority: ca.pem",
                      "    client-certificate: c.pem\n    client-key: k.pem")  # fmt: skip
    cfg = load(str(path))
    assert cfg.server == "https://127.0.0.1:6443"
    assert isinstance(cfg.ssl, ssl.SSLContext) and cfg.auth_header() is None


def test_inline_data_leaves_no_files(tmp_path, pki):
    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    path = kubeconfig(
        tmp_path,
        f"    server: https://h:1\n    certificate-authority-data: {b64('cert.pem')}",
        f"    client-certificate-data: {b64('cert.pem')}\n    client-key-data: {b64('key.pem')}",
    )
    before = set(Path("/dev/shm").glob("kubelet-emu-*"))
    assert isinstance(load(str(path)).ssl, ssl.SSLContext)
    assert set(Path("/dev/shm").glob("kubelet-emu-*")) == before


def test_token_and_token_file(tmp_path):
    path = kubeconfig(tmp_path, "    server: http://h:8080", "    token: abc")
    assert load(str(path)).auth_header() == "Bearer abc"
    (tmp_path / "tok").write_text("rotated\n")
    path = kubeconfig(tmp_path, "    server: http://h:8080", "    tokenFile: tok")
    assert load(str(path)).auth_header() == "Bearer rotated"


def test_exec_users_need_the_plugin_fallback(tmp_path):
    path = kubeconfig(
        tmp_path,
        "    server: https://h:1",
        "    exec: {command: get-token, apiVersion: client.authentication.k8s.io/v1}",
    )
    with pytest.raises(NeedsPlugin):
        load(str(path))


@pytest.mark.parametrize(
    ("cluster", "user", "current", "message"),
    [
        ("    server: https://h:1", "    token: x", "other", "no context named 'other'"),
        ("    server: ''", "    token: x", "ctx", "has no https:// server URL"),
        ("    server: https://h:1\n    certificate-authority: /no/such/ca.pem", "    token: x", "ctx", "cannot load"),
    ],
)
def test_errors_are_one_line_naming_the_file(tmp_path, cluster, user, current, message):
    path = kubeconfig(tmp_path, cluster, user, current)
    with pytest.raises(KubeconfigError) as info:
        load(str(path))
    assert str(path) in str(info.value) and message in str(info.value) and "\n" not in str(info.value)
