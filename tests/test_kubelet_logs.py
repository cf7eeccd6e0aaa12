"""The kubelet API's log reading, request mapping, config, certificate and credentials, on real files
(no cluster needed).

Expected outputs follow the kubelet's reader (k8s.io/cri-client pkg/logs, v1.36): records are
counted for tailLines, P pieces join without a newline, timestamps carry 9 fraction digits, only
the current file is read, and limitBytes cuts the output.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import pytest
from multidict import MultiDict

from agent.kubelet_api.logfile import LogOptions, LogReadError, parse_record, read_log, tail_start
from agent.kubelet_api.logs_route import BadQuery, log_path, parse_query, run_number, select_container_id
from agent.kubelet_api.paths import invalid_name, subresources, verb
from runtimes.crilog import CriLogWriter

T1 = "2026-01-02T03:04:05.1Z"
T2 = "2026-01-02T03:04:06.123456789Z"
T3 = "2026-01-02T03:04:07Z"
NS1 = 1767323045_100000000  # T1 in epoch nanoseconds


async def read(path: Path, **kw) -> bytes:
    return b"".join([chunk async for chunk in read_log(str(path), LogOptions(**kw))])


def write(path: Path, *records: str) -> Path:
    path.write_text("".join(r + "\n" for r in records))
    return path


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return write(
        tmp_path / "0.log",
        f"{T1} stdout F one",
        f"{T2} stderr F two",
        f"{T2} stdout P thr",
        f"{T3} stdout F ee",
        f"{T3} stdout F four",
    )


# --- parsing and the plain read --------------------------------------------------------------------


def test_parse_record_keeps_the_newline_of_full_records_only():
    full = parse_record(f"{T1} stdout F hello\n".encode())
    assert (full.stream, full.partial, full.message, full.ns) == ("stdout", False, b"hello\n", NS1)
    piece = parse_record(f"{T1} stderr P hel\n".encode())
    assert (piece.partial, piece.message) == (True, b"hel")
    assert parse_record(f"{T1} stdout F:x tagged\n".encode()).message == b"tagged\n"
    assert parse_record(b"2026-01-02T04:04:05.1+01:00 stdout F z\n").ns == NS1
    for bad in (b"garbage", b"2026-01-02 stdout F x", f"{T1} stdin F x".encode()):
        with pytest.raises(ValueError):
            parse_record(bad)


async def test_all_lines_with_partial_pieces_joined(log: Path):
    assert await read(log) == b"one\ntwo\nthree\nfour\n"


async def test_timestamps_are_fixed_width_and_only_where_a_line_starts(log: Path):
    assert await read(log, timestamps=True) == (
        b"2026-01-02T03:04:05.100000000Z one\n"
        b"2026-01-02T03:04:06.123456789Z two\n"
        b"2026-01-02T03:04:06.123456789Z three\n"
        b"2026-01-02T03:04:07.000000000Z four\n"
    )


async def test_tail_counts_records_not_lines(log: Path):
    assert await read(log, tail_lines=1) == b"four\n"
    assert await read(log, tail_lines=2) == b"ee\nfour\n"  # the P piece "thr" is the third record
    assert await read(log, tail_lines=0) == b""
    assert await read(log, tail_lines=100) == b"one\ntwo\nthree\nfour\n"


def test_tail_start_across_blocks(tmp_path: Path):
    path = tmp_path / "big.log"
    records = [f"{T1} stdout F line {i:05d} " + "x" * 300 for i in range(50)]
    write(path, *records)
    with open(path, "rb") as f:
        start = tail_start(f, 7)
        f.seek(start)
        assert f.read().decode().splitlines() == records[-7:]
        assert tail_start(f, 500) == 0 and tail_start(f, -1) == 0


async def test_since_filters_after_tail(log: Path):
    assert await read(log, since_ns=NS1 + 1) == b"two\nthree\nfour\n"
    assert await read(log, since_ns=NS1 + 10**10) == b""
    assert await read(log, tail_lines=2, since_ns=NS1 + 1) == b"ee\nfour\n"


async def test_limit_bytes_cuts_the_output_timestamps_included(log: Path):
    assert await read(log, limit_bytes=6) == b"one\ntw"
    assert await read(log, limit_bytes=1000) == b"one\ntwo\nthree\nfour\n"
    assert await read(log, limit_bytes=10, timestamps=True) == b"2026-01-02"


async def test_unfinished_last_record_and_bad_records(tmp_path: Path):
    path = tmp_path / "0.log"
    path.write_text(f"{T1} stdout F a\nnot a record\n{T1} stdout F b\n{T1} stdout F unfinished")
    assert await read(path) == b"a\nb\nunfinished"


async def test_unknown_format_is_the_kubelets_error(tmp_path: Path):
    path = write(tmp_path / "0.log", "plain text", f"{T1} stdout F a")
    with pytest.raises(LogReadError, match="failed to get parse function"):
        await read(path)
    with pytest.raises(LogReadError, match="failed to open log file"):
        await read(tmp_path / "missing.log")


async def test_only_the_current_file_is_read_like_the_kubelet(tmp_path: Path):
    """Rotated files (<n>.log.<stamp>) hold older lines; the kubelet does not read them."""
    path = tmp_path / "0.log"
    writer = CriLogWriter(str(path), max_size=200, max_files=3)
    for i in range(12):
        writer.write("stdout", f"line {i:02d} {'y' * 40}\n".encode())
    writer.close()
    rotated = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("0.log."))
    assert rotated, "the writer should have rotated"
    out = (await read(path)).decode().splitlines()
    assert out and out[-1].startswith("line 11")
    assert not any(line.startswith("line 00") for line in out)
    assert len(out) == len(path.read_text().splitlines())


async def test_crilog_writer_output_round_trips(tmp_path: Path):
    path = tmp_path / "0.log"
    writer = CriLogWriter(str(path))
    writer.write("stdout", b"a" * 20000 + b"\nsecond\npartial")  # 16 KiB pieces, then a trailing piece
    writer.write("stdout", b" end\n")
    writer.close()
    assert await read(path) == b"a" * 20000 + b"\nsecond\npartial end\n"


# --- following -------------------------------------------------------------------------------------


async def test_follow_streams_new_records_and_ends_when_the_container_stops(tmp_path: Path):
    path = write(tmp_path / "0.log", f"{T1} stdout F first")
    running = True

    async def is_running() -> bool:
        return running

    got: list[bytes] = []

    async def follow() -> None:
        async for chunk in read_log(str(path), LogOptions(follow=True, tail_lines=0), is_running):
            got.append(chunk)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.3)
    assert got == []  # tail 0: nothing old
    with open(path, "a") as f:
        f.write(f"{T2} stdout F sec")
        f.flush()
        await asyncio.sleep(0.3)
        assert b"".join(got) == b""  # an unfinished record waits for its newline
        f.write("ond\n")
    await asyncio.sleep(0.4)
    assert b"".join(got) == b"second\n"
    with open(path, "a") as f:
        f.write(f"{T3} stdout P la\n{T3} stdout F st\n")
    running = False
    await asyncio.wait_for(task, 5)
    assert b"".join(got) == b"second\nlast\n"


async def test_follow_goes_on_in_the_new_file_after_rotation(tmp_path: Path):
    path = tmp_path / "0.log"
    writer = CriLogWriter(str(path), max_size=150, max_files=3)
    writer.write("stdout", b"before\n")
    running = True

    async def is_running() -> bool:
        return running

    got: list[bytes] = []

    async def follow() -> None:
        async for chunk in read_log(str(path), LogOptions(follow=True), is_running):
            got.append(chunk)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.3)
    for i in range(6):
        writer.write("stdout", f"after {i} {'z' * 30}\n".encode())
        await asyncio.sleep(0.15)
    writer.close()
    await asyncio.sleep(0.5)
    running = False
    await asyncio.wait_for(task, 5)
    lines = b"".join(got).decode().splitlines()
    assert lines[0] == "before"
    assert [line.split()[1] for line in lines[1:]] == [str(i) for i in range(6)]


# --- the request: query, container choice, paths, authorization ------------------------------------


def test_query_decoding_and_validation_as_the_kubelet():
    opts, previous = parse_query(MultiDict(follow="true", tailLines="5", timestamps="1", previous="0"))
    assert (opts.follow, opts.tail_lines, opts.timestamps, previous) == (True, 5, True, False)
    assert parse_query(MultiDict(follow=""))[0].follow is True  # apimachinery: only false/0 are false
    assert parse_query(MultiDict(tail="3"))[0].tail_lines == 3
    assert parse_query(MultiDict(tailLines="9223372036854775807"))[0].tail_lines == 2**63 - 1
    assert parse_query(MultiDict(tailLines="+7"))[0].tail_lines == 7
    assert parse_query(MultiDict(tail="all", tailLines="3"))[0].tail_lines is None
    opts, _ = parse_query(MultiDict(sinceSeconds="10"), now_ns=100 * 10**9)
    assert opts.since_ns == 90 * 10**9
    opts, _ = parse_query(MultiDict(sinceTime="2026-01-02T03:04:05Z"))
    assert opts.since_ns == NS1 - 100_000_000
    for query, status in (
        ({"tailLines": "x"}, 400),
        ({"tailLines": "99999999999999999999"}, 400),  # not an int64: the kubelet cannot decode it
        ({"tailLines": "9223372036854775808"}, 400),
        ({"limitBytes": "1_000"}, 400),  # Python's int() reads these; Go's ParseInt does not
        ({"tailLines": " 5"}, 400),
        ({"tailLines": "٣"}, 400),
        ({"sinceTime": "yesterday"}, 400),
        ({"tailLines": "-1"}, 422),
        ({"limitBytes": "0"}, 422),
        ({"sinceSeconds": "0"}, 422),
        ({"sinceSeconds": "5", "sinceTime": "2026-01-02T03:04:05Z"}, 422),
        ({"stream": "Stdout"}, 400),
    ):
        with pytest.raises(BadQuery) as info:
            parse_query(MultiDict(query))
        assert info.value.status == status, query


def test_container_choice_follows_the_kubelet():
    running = {"state": {"running": {}}, "containerID": "process://a-main-2", "lastState": {}}
    assert select_container_id("p", running, "main", False) == "process://a-main-2"
    with pytest.raises(ValueError, match='previous terminated container "main" in pod "p" not found'):
        select_container_id("p", running, "main", True)
    restarted = {**running, "lastState": {"terminated": {"containerID": "process://a-main-1"}}}
    assert select_container_id("p", restarted, "main", True) == "process://a-main-1"
    waiting = {"state": {"waiting": {"reason": "ContainerCreating"}}, "lastState": {}}
    with pytest.raises(ValueError, match="is waiting to start: ContainerCreating"):
        select_container_id("p", waiting, "main", False)
    assert run_number("process://0123abcd-main-7", "main", 0) == 7
    assert run_number("emulated://fast-0123abcd-main-7-42", "main", 3) == 3


def test_log_path_stays_inside_the_pod_dir(tmp_path: Path):
    pod = {"metadata": {"namespace": "default", "name": "web", "uid": "u-1"}}
    assert log_path(str(tmp_path), pod, "main", 2) == str(tmp_path / "default_web_u-1" / "main" / "2.log")
    with pytest.raises(ValueError):
        log_path(str(tmp_path), pod, "../../etc", 0)
    os.makedirs(tmp_path / "default_web_u-1" / "evil")
    os.symlink("/etc", tmp_path / "default_web_u-1" / "evil" / "0.log")
    with pytest.raises(ValueError):
        log_path(str(tmp_path), pod, "evil", 0)


@pytest.mark.parametrize(
    "names",
    [("default", "..", "c"), ("..", "p", "c"), ("default", "p", ".."), ("default", "../../etc", "c"),
     ("default", "p", "a/b"), ("Default", "p", "c"), ("default", "p", "")],
)  # fmt: skip
def test_invalid_names_are_refused(names):
    assert invalid_name(*names)


def test_valid_names_pass():
    assert invalid_name("kube-system", "web-0.abc", "main") is None


@pytest.mark.parametrize(
    ("path", "subs"),
    [
        ("/containerLogs/default/p/c", ["proxy"]),
        ("/logs/", ["log"]),
        ("/logs/syslog", ["log"]),
        ("/stats/summary", ["stats"]),
        ("/metrics", ["metrics"]),
        ("/metrics/resource", ["metrics"]),
        ("/pods", ["pods", "proxy"]),
        ("/runningpods/", ["pods", "proxy"]),
        ("/healthz", ["healthz", "proxy"]),
        ("/healthz/ping", ["healthz", "proxy"]),
        ("/configz", ["configz", "proxy"]),
        ("/exec/default/p/c", ["proxy"]),
        ("/statsx", ["proxy"]),
        ("/podsx", ["proxy"]),
    ],
)
def test_subresources_as_the_kubelet_maps_them(path: str, subs: list[str]):
    assert subresources(path) == subs


def test_verbs():
    assert [verb(m) for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")] == [
        "get", "create", "update", "patch", "delete", "",
    ]  # fmt: skip


async def test_tail_of_a_large_file_reads_only_its_end(tmp_path: Path):
    path = tmp_path / "0.log"
    with open(path, "w") as f:
        f.writelines(f"{T1} stdout F {i}\n" for i in range(200_000))
    started = time.perf_counter()
    assert await read(path, tail_lines=2) == b"199998\n199999\n"
    assert time.perf_counter() - started < 0.5  # seeks from the end instead of reading ~8 MB


# --- config, certificate, credentials --------------------------------------------------------------


def test_kubelet_api_config_defaults_and_errors(tmp_path: Path):
    from agent.config import ConfigError, load_config

    default = load_config(write(tmp_path / "a.toml", "")).kubelet_api
    assert (default.enabled, default.address, default.port, default.anonymous) == (True, "0.0.0.0", None, False)
    assert default.authorization_mode == "Webhook" and default.client_ca_file is None
    write(tmp_path / "ca.pem", "x")
    cfg = load_config(
        write(
            tmp_path / "b.toml",
            "[kubelet_api]",
            "port = 0",
            'address = "127.0.0.1"',
            'client_ca_file = "ca.pem"',
            "anonymous = true",
            'authorization_mode = "AlwaysAllow"',
        )
    ).kubelet_api
    assert (cfg.port, cfg.address, cfg.anonymous, cfg.authorization_mode) == (0, "127.0.0.1", True, "AlwaysAllow")
    assert cfg.client_ca_file == str(tmp_path / "ca.pem")  # relative to the config file
    for body, message in (
        ("port = 70000", "port must be between 0"),
        ('authorization_mode = "RBAC"', 'authorization_mode must be "Webhook" or "AlwaysAllow"'),
        ('tls_cert_file = "ca.pem"', "tls_cert_file and tls_key_file go together"),
        ('client_ca_file = "missing.pem"', 'client_ca_file "missing.pem" does not exist'),
        ('anonymous = "yes"', "anonymous must be true or false"),
        ('serving_cert = "acme"', 'serving_cert must be "self-signed" or "csr"'),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)) as info:
            load_config(write(tmp_path / "c.toml", "[kubelet_api]", body))
        assert "[kubelet_api]" in str(info.value)
    warned = load_config(write(tmp_path / "d.toml", "[kubelet_api]", "prot = 1")).warnings
    assert any('unknown key "prot"' in w and "port" in w for w in warned)


async def test_self_signed_certificate_is_reused_and_remade_when_names_change(tmp_path: Path):
    from cryptography import x509

    from agent.kubelet_api.tls import ServingNames, self_signed

    names = ServingNames.of("node-a", "VM", "10.0.0.5", "")
    assert names == ServingNames(("node-a", "vm"), ("10.0.0.5",))
    cert, key = await self_signed(tmp_path, names)
    assert key.stat().st_mode & 0o777 == 0o600
    first = cert.read_bytes()
    parsed = x509.load_pem_x509_certificate(first)
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["node-a", "vm"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert (await self_signed(tmp_path, names))[0].read_bytes() == first  # reused at restart
    await self_signed(tmp_path, ServingNames.of("node-a", "vm", "10.0.0.6"))
    assert cert.read_bytes() != first  # the IP changed: a new certificate
    ssl_ctx = server_context_for(cert, key)
    assert ssl_ctx.verify_mode.name == "CERT_NONE"


def server_context_for(cert: Path, key: Path):
    from agent.kubelet_api.tls import server_context

    return server_context(cert, key, None)


def test_bad_serving_files_name_the_fix(tmp_path: Path):
    from agent.kubelet_api.tls import TLSConfigError, server_context

    write(tmp_path / "bad.crt", "not a certificate")
    with pytest.raises(TLSConfigError, match="tls_cert_file"):
        server_context(tmp_path / "bad.crt", tmp_path / "bad.crt", None)


def test_credentials_from_certificates_and_headers():
    from agent.kubelet_api.authn import bearer_token, user_from_peercert

    peer = {"subject": ((("commonName", "kube-apiserver-kubelet-client"),), (("organizationName", "system:masters"),))}
    user = user_from_peercert(peer)
    assert user is not None and user.name == "kube-apiserver-kubelet-client"
    assert user.groups == ("system:masters", "system:authenticated")
    assert user_from_peercert(None) is None and user_from_peercert({}) is None
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token(None) is None


async def test_anonymous_only_when_enabled_and_without_credentials():
    from agent.kubelet_api.authn import Authenticator

    anonymous = await Authenticator(kube=None, anonymous=True).authenticate(None, None)  # type: ignore[arg-type]
    assert anonymous is not None and (anonymous.name, anonymous.groups) == (
        "system:anonymous",
        ("system:unauthenticated",),
    )
    assert await Authenticator(kube=None, anonymous=False).authenticate(None, None) is None  # type: ignore[arg-type]
    assert await Authenticator(kube=None, anonymous=True).authenticate(None, "Basic x") is None  # type: ignore[arg-type]


def test_explicit_port_in_use_is_an_error_and_the_default_falls_back():
    import socket

    from agent.config import KubeletAPISettings
    from agent.kubelet_api.server import KubeletAPIError, bind

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(KubeletAPIError, match=f"127.0.0.1:{port}.*set \\[kubelet_api\\] port"):
            bind(KubeletAPISettings(address="127.0.0.1", port=port))
        with pytest.raises(KubeletAPIError):
            bind(KubeletAPISettings(address="127.0.0.1"), cli_port=port)
    free = bind(KubeletAPISettings(address="127.0.0.1", port=0))
    assert free.getsockname()[1] > 0
    free.close()


async def test_a_symlink_in_the_logs_place_is_never_followed(tmp_path: Path):
    secret = write(tmp_path / "secret", f"{T1} stdout F do not show")
    os.symlink(secret, tmp_path / "0.log")
    with pytest.raises(LogReadError, match="failed to open log file"):
        await read(tmp_path / "0.log")
