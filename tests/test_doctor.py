"""`kubelet-emu doctor`: every check named with its outcome, the fix for what is missing, and an
exit code a script can use. Runs the real command on this host; needs no cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, agent_argv, agent_env

from agent import preflight
from agent.config import load_config


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*agent_argv(), "doctor", *args], capture_output=True, text=True, env=agent_env(), timeout=60)


def test_every_check_is_named_with_its_outcome() -> None:
    result = doctor("--for", "tests")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("kubelet-emu doctor: checks for tests")
    rows = {line.split()[1]: line.split()[0] for line in lines[1:] if line.startswith("  ") and line.split()[0] in
            ("ok", "MISSING", "warning")}  # fmt: skip
    for name in ("kernel", "python", "cgroups", "network", "runtime", "docker-registry", "skopeo", "umoci"):
        assert name in rows, result.stdout
    assert rows["kernel"] == "ok" and rows["python"] == "ok"
    # The exit code says whether something required is missing, and the last line how to get it.
    missing = [name for name, status in rows.items() if status == "MISSING"]
    assert result.returncode == (1 if missing else 0), result.stdout + result.stderr
    if missing:
        assert "apt-get install" in result.stderr


def test_a_missing_runtime_fails_with_the_fix(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('default_runtime = "fast"\n[runtimes.fast]\nbackend = "emulated"\n'
                      '[runtimes.secure]\nbackend = "oci"\nruntime_path = "/opt/nowhere/runsc"\n')  # fmt: skip
    result = doctor("--config", str(config))
    assert result.returncode == 1
    assert "MISSING  runtime of handler secure" in result.stdout
    assert "/opt/nowhere/runsc does not exist" in result.stdout
    assert "fix: install runsc, or set [runtimes.secure] runtime_path" in result.stdout


def test_a_missing_runc_names_its_debian_package(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[runtimes.boxed]\nbackend = "oci"\nruntime_path = "/opt/nowhere/runc"\n')
    loaded = load_config(config, check_paths=False)
    checks = preflight.host_checks(loaded, "run", with_port=False)
    runtime = next(c for c in checks if c.name == "runtime of handler boxed")
    assert not runtime.ok and runtime.packages == ("runc",)
    assert preflight.missing_packages(checks)["runc"] == runtime.name + ": " + runtime.detail
    assert "runc" in preflight.how_to_install(checks)


def test_the_default_config_needs_nothing_but_the_python_packages() -> None:
    result = doctor()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "python packages" in result.stdout and "MISSING" not in result.stdout


def test_run_refuses_a_missing_runtime_in_one_line(tmp_path: Path) -> None:
    """`run` reads the same configuration check: one line naming the field and the fix, exit 2."""
    config = tmp_path / "agent.toml"
    config.write_text('[runtimes.boxed]\nbackend = "oci"\nruntime_path = "/opt/nowhere/runc"\n')
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    result = subprocess.run(
        [*agent_argv(), "run", "--kubeconfig", str(kubeconfig), "--config", str(config), "--node-name", "x",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, env=agent_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "runtime_path" in lines[0] and "/opt/nowhere/runc" in lines[0], result.stderr


def test_declared_requirements_follow_pyproject() -> None:
    """The package check reads the installed metadata, so it can never drift from pyproject."""
    names = {name for name, _ in preflight.declared_requirements()}
    text = (REPO / "pyproject.toml").read_text()
    if not names:
        return  # not installed as a package (then doctor says so and checks nothing)
    for name in ("aiohttp", "cryptography", "kubernetes_asyncio"):
        assert name in names and f'"{name}' in text
    assert "pytest" not in names and "pytest" in {n for n, _ in preflight.declared_requirements(("test",))}
    assert os.path.basename(sys.executable)
