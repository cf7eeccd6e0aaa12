"""`kubelet-emu join` against the dev cluster, which behaves like a kubeadm cluster: token discovery
(JWS + CA hash), TLS bootstrap through a CSR, and the refusals."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import Kubectl, eventually, free_port, wait_node_ready
from join_helpers import Joiner, csrs, join_args

from agent.bootstrap import join as join_mod
from devcluster import manage

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def joiner(cluster, tmp_path):
    j = Joiner(cluster, tmp_path)
    yield j
    await j.close()


def _cert_and_ca(state: Path, cluster: manage.Cluster):
    from cryptography import x509

    pem = (state / "pki" / "kubelet-client-current.pem").read_bytes()
    return x509.load_pem_x509_certificate(pem), x509.load_pem_x509_certificate(cluster.ca_cert.read_bytes()), pem


async def test_join_with_printed_command_gives_a_ready_node_with_its_own_identity(cluster, kubectl, joiner):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from cryptography.x509.oid import NameOID

    node = "emu-joined"
    command = await manage.token_create(cluster.dir)
    token = join_args(command)[3]
    started = time.monotonic()
    agent = await joiner.join(node, command)
    await joiner.wait_ready(node)
    elapsed = time.monotonic() - started
    print(f"\njoin to Ready: {elapsed:.1f}s")

    state = joiner.state_dir(node)
    link = state / "pki" / "kubelet-client-current.pem"
    assert link.is_symlink()
    target = link.resolve()
    assert target.name.startswith("kubelet-client-2") and target.name.endswith(".pem")
    for private in (target, state / "kubeconfig", state / "bootstrap-kubeconfig"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    cert, ca, pem = _cert_and_ca(state, cluster)
    cert.verify_directly_issued_by(ca)  # the cluster CA signed it (through the CSR signer)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"system:node:{node}"
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == ["system:nodes"]
    key = load_pem_private_key(pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    kubeconfig = yaml.safe_load((state / "kubeconfig").read_text())
    assert kubeconfig["users"][0]["user"]["client-certificate"] == str(link)

    # The CSR was made with the bootstrap token and auto-approved (nodeclient).
    token_id = token.split(".")[0]
    mine = [c for c in await csrs(kubectl) if c["spec"]["username"] == f"system:bootstrap:{token_id}"]
    assert len(mine) == 1
    assert mine[0]["spec"]["signerName"] == "kubernetes.io/kube-apiserver-client-kubelet"
    assert {c["type"] for c in mine[0]["status"]["conditions"]} >= {"Approved"}

    # Never admin, never the CA key: nothing from the cluster dir's private files is on the node.
    secrets = [(cluster.dir / "pki" / n).read_bytes() for n in ("ca.key", "admin.key")]
    for path in state.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert not any(s.strip() in data for s in secrets), path
    assert token.split(".")[1] not in agent.log, "the bootstrap token secret must never be logged"

    # NodeRestriction applies to the joined identity: it cannot touch another node.
    await kubectl.apply("apiVersion: v1\nkind: Node\nmetadata:\n  name: emu-joined-other\n")
    try:
        argv, env = manage.kubectl_argv(cluster, ["label", "node", "emu-joined-other", "x=y"])
        env["KUBECONFIG"] = str(state / "kubeconfig")
        proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)  # fmt: skip
        _, err = await proc.communicate()
        assert proc.returncode != 0 and "forbidden" in err.decode().lower(), err.decode()
    finally:
        await kubectl.run("delete", "node", "emu-joined-other", "--wait=false", check=False)
    assert agent.alive


async def test_join_refusals_one_line_each_and_no_csr_for_a_wrong_ca(cluster, kubectl, joiner, tmp_path):
    command = await manage.token_create(cluster.dir)
    args = join_args(command)
    server, token, ca_hash = args[1], args[3], args[5]
    token_id = token.split(".")[0]
    before = len(await csrs(kubectl))

    cases = {
        "wrong CA hash": (token, "sha256:" + "0" * 64, "public key hash"),
        "unknown token": ("zz9zz9.0123456789abcdef", ca_hash, "does not exist in this cluster or has expired"),
        # Same token ID, another secret: what a token of another cluster with a clashing ID looks like.
        "token of a different cluster": (f"{token_id}.0123456789abcdef", ca_hash, "belongs to a different cluster"),
    }
    expired = join_args(await manage.token_create(cluster.dir, ttl="1s"))[3]
    await asyncio.sleep(3)
    cases["expired token"] = (expired, ca_hash, "expired")
    for what, (tok, hash_, cause) in cases.items():
        state = tmp_path / what.replace(" ", "-")
        code, err = await joiner.join_only(f"kubelet-emu join {server} --token {tok} "
                                           f"--discovery-token-ca-cert-hash {hash_}", state)  # fmt: skip
        lines = err.strip().splitlines()
        assert code == 1, (what, err)
        assert len(lines) == 1 and lines[0].startswith("kubelet-emu: join refused: "), (what, err)
        assert cause in lines[0], (what, lines[0])
        assert tok.split(".")[1] not in err
        assert not (state / "bootstrap-kubeconfig").exists(), what
    assert len(await csrs(kubectl)) == before, "a refused join sends nothing, creates no CSR"


async def test_without_auto_approval_the_agent_waits_says_the_approve_command_once(cluster, kubectl, joiner):
    binding = "kubeadm:node-autoapprove-bootstrap"
    await kubectl("delete", "clusterrolebinding", binding)
    try:
        node = "emu-manual-approve"
        agent = await joiner.join(node, await manage.token_create(cluster.dir))

        async def said():
            return "kubectl certificate approve csr-" in agent.log

        await eventually(said, 30, what="the approve command in the log")
        await asyncio.sleep(4)
        assert agent.alive
        assert agent.log.count("kubectl certificate approve") == 1
        assert await kubectl.get("node", node) is None
        name = agent.log.split("kubectl certificate approve ", 1)[1].split()[0].strip('"')
        await kubectl("certificate", "approve", name)
        await joiner.wait_ready(node, 30)
    finally:
        await kubectl.run(
            "create", "clusterrolebinding", binding, "--group=system:bootstrappers",
            "--clusterrole=system:certificates.k8s.io:certificatesigningrequests:nodeclient", check=False,
        )  # fmt: skip


def _expired_kubeconfig(cluster: manage.Cluster, node: str, path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca = x509.load_pem_x509_certificate(cluster.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key((cluster.dir / "pki" / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"system:node:{node}")])  # fmt: skip
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=2)).not_valid_after(now - dt.timedelta(hours=1))
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = path.with_suffix(".pem")
    pem.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ca_data = base64.b64encode(cluster.ca_cert.read_bytes()).decode()
    doc = {
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": cluster.server, "certificate-authority-data": ca_data}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": {"client-certificate": str(pem), "client-key": str(pem)}}],
    }  # fmt: skip
    path.write_text(yaml.safe_dump(doc))


async def test_expired_certificate_without_bootstrap_one_line_then_picks_up_a_new_one(cluster, start_agent, tmp_path):
    node = "emu-expired"
    kubeconfig = tmp_path / "expired.kubeconfig"
    _expired_kubeconfig(cluster, node, kubeconfig)
    agent = await start_agent(node, kubeconfig=kubeconfig, extra=("--port", str(free_port())))

    async def said():
        return "expired at" in agent.log

    await eventually(said, 15, what="the expired line")
    await asyncio.sleep(3)
    assert agent.alive, "waits, does not crash-loop"
    assert agent.log.count("expired at") == 1
    assert "kubelet-emu starting" not in agent.log
    # An admin renews the certificate (here: a new kubeconfig at the same path): picked up.
    shutil.copy(await manage.node_kubeconfig(cluster.dir, node), kubeconfig)
    await wait_node_ready(Kubectl(cluster), node, timeout=30)


def test_jws_matches_the_bootstrapsigner_format():
    content = "apiVersion: v1\nkind: Config\n"
    jws = join_mod.detached_jws(content, "abcdef", "0123456789abcdef")
    _, payload, _ = jws.split(".")
    assert payload == ""  # detached
    assert join_mod.verify_detached_jws(jws, content, "abcdef", "0123456789abcdef")
    assert not join_mod.verify_detached_jws(jws, content + " ", "abcdef", "0123456789abcdef")
    assert not join_mod.verify_detached_jws(jws, content, "abcdef", "0123456789abcdeX")
    assert not join_mod.verify_detached_jws(jws, content, "zzzzzz", "0123456789abcdef")


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (no systemd on this host)")
    unit = (REPO / "examples" / "systemd" / "kubelet-emu.service").read_text()
    # The unit names the installed command; point it at this environment's for the check.
    exe = Path(sys.executable).parent / "kubelet-emu"
    if not exe.exists():
        exe = Path(shutil.which("kubelet-emu") or "/bin/true")
    path = tmp_path / "kubelet-emu.service"
    path.write_text(unit.replace("/usr/local/bin/kubelet-emu", str(exe)))
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "warning"}
    proc = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, env=env, timeout=60)
    problems = [
        line for line in (proc.stdout + proc.stderr).splitlines()
        # Verifying outside a booted systemd (containers): messages about the host, not the unit.
        if line.strip() and "kubelet-emu.service" in line
    ]  # fmt: skip
    if proc.returncode != 0 and not problems and "System has not been booted" in proc.stderr + proc.stdout:
        pytest.skip("systemd-analyze cannot verify here: " + (proc.stderr or proc.stdout).strip().splitlines()[0])
    assert not problems, proc.stdout + proc.stderr
