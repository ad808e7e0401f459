"""Operations, on a real memplugd: health, reflection, Prometheus metrics, logs, `memplug status`.

Everything goes through what an operator's tools would use: grpc.health.v1 (as
grpc_health_probe or a HEALTHCHECK would), server reflection (as grpcurl would,
with no .proto at hand), an HTTP scrape of /metrics, the daemon's own log lines
and the `memplug` command.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import HUGE_2M, JOURNAL_IS_LOG, DaemonProcess, MiB, require
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from memplug.client.attach import redeem
from memplug.client.errors import PermissionDenied
from memplug.daemon import __version__
from memplug.v1 import memplug_pb2 as pb

Factory = Callable[..., DaemonProcess]
Samples = list[tuple[str, dict[str, str], float]]

SERVICE = "memplug.v1.Memplug"
CLI = [sys.executable, "-m", "memplug.client.cli"]
EXIT_UNREACHABLE = 8


def memplug(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the `memplug` command against this daemon."""
    return subprocess.run(
        [*CLI, "--socket", str(daemon.socket), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --------------------------------------------------------------------------- health


def health_check(channel: grpc.Channel, service: str) -> str:
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def test_health_serving_for_the_server_and_the_service(daemon: DaemonProcess) -> None:
    assert health_check(daemon.channel, "") == "SERVING"
    assert health_check(daemon.channel, SERVICE) == "SERVING"
    with pytest.raises(grpc.RpcError) as err:
        health_check(daemon.channel, "no.such.Service")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_memplug_health_command(daemon: DaemonProcess) -> None:
    out = memplug(daemon, "health")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SERVING"
    out = memplug(daemon, "health", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"status": "SERVING"}


def test_memplug_health_with_capabilities_alone(daemon: DaemonProcess) -> None:
    """A non-root user that reaches the socket through CAP_DAC_OVERRIDE alone.

    That is the image's documented non-root mode (`--user memplug --cap-add
    DAC_OVERRIDE` on a root-owned socket directory), where HEALTHCHECK runs
    `memplug health`. access(2) ignores capabilities for a non-root real uid,
    so an access()-based "readable" check refuses a socket connect(2) reaches.
    """
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
    daemon.socket.parent.chmod(0o700)  # root's, closed to others: as a bind-mounted host dir
    as_nobody = [
        "setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
        "--inh-caps", "+dac_override", "--ambient-caps", "+dac_override", "--",
    ]  # fmt: skip
    # The client library connects: the capability is all it takes.
    script = "import sys; from memplug.client import Client; print(Client(sys.argv[1]).health())"
    out = subprocess.run(
        [*as_nobody, sys.executable, "-c", script, str(daemon.socket)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (out.returncode, out.stdout.strip()) == (0, "SERVING"), out.stderr
    # ... and so must the command.
    out = subprocess.run(
        [*as_nobody, *CLI, "--socket", str(daemon.socket), "health"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (out.returncode, out.stdout.strip()) == (0, "SERVING"), out.stderr


def test_not_serving_once_sigterm_begins(daemon: DaemonProcess) -> None:
    """A Watch opened before SIGTERM sees NOT_SERVING before the daemon goes away."""
    stub = health_pb2_grpc.HealthStub(daemon.channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)
    statuses: queue.Queue[str] = queue.Queue()

    def read() -> None:
        try:
            for response in watch:
                statuses.put(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
        except grpc.RpcError:
            pass  # cancelled by us, or the server went away
        statuses.put("<end>")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert statuses.get(timeout=10) == "SERVING"
    daemon.proc.send_signal(signal.SIGTERM)
    assert statuses.get(timeout=10) == "NOT_SERVING"
    watch.cancel()
    reader.join(timeout=10)
    assert daemon.proc.wait(timeout=30) == 0, daemon.log()
    out = memplug(daemon, "health")
    assert out.returncode == EXIT_UNREACHABLE, (out.stdout, out.stderr)


# --------------------------------------------------------------------------- reflection


def reflect(channel: grpc.Channel, **request: Any) -> Any:
    """One ServerReflectionInfo exchange; fails on an error_response."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (response,) = list(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10
        )
    )
    assert not response.HasField("error_response"), response.error_response
    return response


def pool_for_symbol(channel: grpc.Channel, symbol: str) -> descriptor_pool.DescriptorPool:
    """A fresh descriptor pool holding the file that defines symbol, and its imports."""
    response = reflect(channel, file_containing_symbol=symbol)
    files = {}
    for raw in response.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        files[proto.name] = proto
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        if name not in files:  # an import the server did not send: ask for it
            sent = reflect(channel, file_by_filename=name).file_descriptor_response
            files[name] = descriptor_pb2.FileDescriptorProto.FromString(
                sent.file_descriptor_proto[0]
            )
        for dep in files[name].dependency:
            add(dep)
        pool.Add(files[name])
        added.add(name)

    for name in list(files):
        add(name)
    return pool


def dynamic_call(
    channel: grpc.Channel, pool: descriptor_pool.DescriptorPool, method: str, body: dict[str, Any]
) -> Message:
    """Call SERVICE/method with a request built from JSON, knowing only the pool."""
    descriptor = pool.FindServiceByName(SERVICE).FindMethodByName(method)
    request_class = message_factory.GetMessageClass(descriptor.input_type)
    response_class = message_factory.GetMessageClass(descriptor.output_type)
    assert request_class.DESCRIPTOR.file.pool is pool  # not the generated memplug.v1 code
    call = channel.unary_unary(
        f"/{SERVICE}/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_class.FromString,
    )
    response: Message = call(json_format.ParseDict(body, request_class()), timeout=10)
    return response


def test_reflection_is_enough_to_call_the_daemon(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        listed = reflect(channel, list_services="")
        names = {s.name for s in listed.list_services_response.service}
        assert names >= {
            SERVICE,
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        pool = pool_for_symbol(channel, SERVICE)
        service = pool.FindServiceByName(SERVICE)
        assert {m.name for m in service.methods} >= {"GetStatus", "CreateRegion", "Plug"}

        status = json_format.MessageToDict(dynamic_call(channel, pool, "GetStatus", {}))
        assert status["version"] == __version__
        assert status.get("regions", 0) == 0

        body = {"name": "dyn0", "size": str(4 * MiB), "backing": "BACKING_SHMEM"}
        region = json_format.MessageToDict(dynamic_call(channel, pool, "CreateRegion", body))
        assert region["name"] == "dyn0" and int(region["size"]) == 4 * MiB
    # The daemon agrees with what the reflection-only client did.
    assert daemon.stub.GetRegion(pb.GetRegionRequest(name="dyn0")).size == 4 * MiB
    assert daemon.stub.GetStatus(pb.GetStatusRequest()).regions == 1


# --------------------------------------------------------------------------- metrics


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int, host: str = "127.0.0.1", wait: float = 10.0) -> Samples:
    """Every sample on /metrics, as (name, labels, value); waits for the listener."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
                assert resp.status == 200
                text = resp.read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of that name whose labels include these; 0 if none."""
    return sum(
        v
        for n, lab, v in samples
        if n == name and all(lab.get(k) == want for k, want in labels.items())
    )


def has(samples: Samples, name: str, **labels: str) -> bool:
    return any(
        n == name and all(lab.get(k) == want for k, want in labels.items()) for n, lab, _ in samples
    )


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN that process pid holds."""
    inodes = set()
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if m := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(m.group(1))
    found = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state != "0A" or inode not in inodes:  # 0A: TCP_LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            if len(addr_hex) == 8:  # IPv4, little-endian
                addr = socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr_hex)[::-1])
            else:
                words = [bytes.fromhex(addr_hex[i : i + 8])[::-1] for i in range(0, 32, 8)]
                addr = socket.inet_ntop(socket.AF_INET6, b"".join(words))
            found.append((addr, int(port_hex, 16)))
    return found


def test_metrics_are_off_by_default(daemon: DaemonProcess) -> None:
    assert health_check(daemon.channel, "") == "SERVING"
    assert listening_sockets(daemon.proc.pid) == []
    assert "metrics on http" not in daemon.log()


def test_metrics_bind_loopback_when_given_a_port(daemon_factory: Factory) -> None:
    port = free_port()
    d = daemon_factory("--metrics", str(port))
    samples = scrape(port)
    assert has(samples, "memplug_regions", backing="shmem")
    assert listening_sockets(d.proc.pid) == [("127.0.0.1", port)]
    assert f"metrics on http://127.0.0.1:{port}/metrics" in d.log()


def test_metrics_follow_operations(
    daemon_factory: Factory, hugetlb_pool: Callable[[int], None]
) -> None:
    hugetlb_pool(3)
    port = free_port()
    d = daemon_factory("--metrics", f"127.0.0.1:{port}", "--max-bytes", "64M")
    size = str(HUGE_2M)

    m = scrape(port)
    assert value(m, "memplug_regions", backing="shmem") == 0
    assert value(m, "memplug_plugged_bytes", backing="shmem") == 0
    assert value(m, "memplug_quota_bytes") == 64 * MiB
    assert value(m, "memplug_quota_used_bytes") == 0
    assert value(m, "memplug_hugetlb_pages", page_size=size, state="total") == 3
    assert value(m, "memplug_rpc_total", rpc="CreateRegion") == 0

    # The pool gauges are read from the kernel at scrape time.
    hugetlb_pool(5)
    m = scrape(port)
    assert value(m, "memplug_hugetlb_pages", page_size=size, state="total") == 5
    assert value(m, "memplug_hugetlb_pages", page_size=size, state="free") == 5

    d.stub.CreateRegion(pb.CreateRegionRequest(name="m0", size=32 * MiB, backing=pb.BACKING_SHMEM))
    plugged = d.plug("m0", 0, 16 * MiB)
    m = scrape(port)
    assert value(m, "memplug_regions", backing="shmem") == 1
    assert value(m, "memplug_plugged_bytes", backing="shmem") == 16 * MiB
    assert value(m, "memplug_allocated_bytes", backing="shmem") == 16 * MiB
    assert value(m, "memplug_quota_used_bytes") == 16 * MiB
    assert value(m, "memplug_rpc_total", rpc="CreateRegion", code="OK") == 1
    assert value(m, "memplug_rpc_total", rpc="Plug", code="OK") == 1
    assert value(m, "memplug_rpc_duration_seconds_count", rpc="Plug") == 1
    assert value(m, "memplug_rpc_duration_seconds_count", rpc="CreateRegion") == 1
    work = value(m, "memplug_work_bytes_total", op="plug", strategy=plugged.strategy)
    assert work == 16 * MiB, (plugged.strategy, [s for s in m if s[0].startswith("memplug_work")])
    assert value(m, "memplug_work_seconds_total", op="plug", strategy=plugged.strategy) > 0

    # A failure is counted under its code.
    with pytest.raises(grpc.RpcError) as err:
        d.stub.GetRegion(pb.GetRegionRequest(name="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # ... and so is going over the quota (16 MiB plugged + 64 MiB > 64 MiB).
    d.stub.CreateRegion(pb.CreateRegionRequest(name="m1", size=64 * MiB, backing=pb.BACKING_SHMEM))
    with pytest.raises(grpc.RpcError) as err:
        d.plug("m1", 0, 64 * MiB)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    m = scrape(port)
    assert value(m, "memplug_rpc_total", rpc="GetRegion", code="NOT_FOUND") == 1
    assert value(m, "memplug_rpc_total", rpc="Plug", code="RESOURCE_EXHAUSTED") == 1
    assert value(m, "memplug_rpc_duration_seconds_count", rpc="Plug") == 2
    assert value(m, "memplug_quota_used_bytes") == 16 * MiB  # the failed plug rolled back

    # Hand-offs: one ok, then the same (one-time) ticket again is refused.
    ticket = d.stub.Attach(pb.AttachRequest(name="m0", access=pb.ACCESS_READ_WRITE)).ticket
    fd, _info = redeem(str(d.fd_socket), ticket)
    os.close(fd)
    with pytest.raises(PermissionDenied):
        redeem(str(d.fd_socket), ticket)
    m = scrape(port)
    assert value(m, "memplug_attach_total", result="ok") == 1
    assert value(m, "memplug_attach_total", result="refused") == 1

    populated = d.populate("m0", 0, 16 * MiB)
    d.stub.Unplug(pb.RangeRequest(name="m0", offset=0, length=32 * MiB))
    m = scrape(port)
    assert value(m, "memplug_work_bytes_total", op="populate", strategy=populated.strategy) == (
        16 * MiB
    )
    assert value(m, "memplug_plugged_bytes", backing="shmem") == 0
    assert value(m, "memplug_quota_used_bytes") == 0
    assert value(m, "memplug_rpc_total", rpc="Unplug", code="OK") == 1

    d.stub.DeleteRegion(pb.DeleteRegionRequest(name="m0"))
    d.stub.DeleteRegion(pb.DeleteRegionRequest(name="m1"))
    m = scrape(port)
    assert value(m, "memplug_regions", backing="shmem") == 0


# --------------------------------------------------------------------------- logs


def exercise(d: DaemonProcess) -> None:
    """A few calls that succeed and one that fails, then a clean stop."""
    d.stub.CreateRegion(pb.CreateRegionRequest(name="log0", size=4 * MiB, backing=pb.BACKING_SHMEM))
    d.plug("log0", 0, 4 * MiB)
    d.stub.GetRegion(pb.GetRegionRequest(name="log0"))
    with pytest.raises(grpc.RpcError):
        d.stub.GetRegion(pb.GetRegionRequest(name="missing"))
    assert d.stop() == 0, d.log()


def json_lines(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(event, dict), line
        assert {"level", "logger", "msg"} <= event.keys(), line
        events.append(event)
    return events


@pytest.fixture
def no_journal(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run the daemon as if outside systemd, even if pytest itself runs under it."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    yield


@pytest.mark.usefixtures("no_journal")
def test_json_logs(daemon_factory: Factory) -> None:
    d = daemon_factory("--log-format", "json")
    exercise(d)
    events = json_lines(d.log())
    assert all(isinstance(e.get("ts"), float) for e in events)
    assert {e["level"] for e in events} <= {"debug", "info", "warning", "error"}
    rpcs = [e for e in events if "rpc" in e]
    by_call = {(e["rpc"], e.get("region")): e for e in rpcs}
    create = by_call[("CreateRegion", "log0")]
    plug = by_call[("Plug", "log0")]
    failed = by_call[("GetRegion", "missing")]
    for event in (create, plug):
        assert event["level"] == "info" and event["status"] == "OK"
        assert isinstance(event["duration_ms"], float | int) and event["duration_ms"] >= 0
    assert plug["offset"] == 0 and plug["length"] == 4 * MiB
    assert failed["level"] == "warning"
    assert failed["status"] == "NOT_FOUND"
    assert "missing" in failed["error"]
    assert isinstance(failed["duration_ms"], float | int)
    # A read that succeeds changes nothing: DEBUG (the tests' daemons log at DEBUG).
    assert by_call[("GetRegion", "log0")]["level"] == "debug"
    assert any(e["msg"] == "stopped" for e in events)


@pytest.mark.usefixtures("no_journal")
def test_info_log_keeps_changes_and_failures_not_reads(daemon_factory: Factory) -> None:
    d = daemon_factory("--log-format", "json", "--log-level", "info")
    exercise(d)
    by_call = {(e["rpc"], e.get("region")): e for e in json_lines(d.log()) if "rpc" in e}
    assert by_call[("CreateRegion", "log0")]["level"] == "info"
    assert by_call[("Plug", "log0")]["level"] == "info"
    assert by_call[("GetRegion", "missing")]["level"] == "warning"
    assert ("GetRegion", "log0") not in by_call


PRIORITY = re.compile(r"<[0-7]>")


def journal_entries(text: str) -> list[str]:
    """Lines as journald stores them: each carries its syslog priority prefix."""
    lines = text.splitlines()
    assert lines and all(PRIORITY.match(line) for line in lines), lines
    return [line[3:] for line in lines]


def test_json_logs_under_journald(daemon_factory: Factory) -> None:
    d = daemon_factory("--log-format", "json", env={"JOURNAL_STREAM": JOURNAL_IS_LOG})
    exercise(d)
    events = json_lines("\n".join(journal_entries(d.log())))
    assert events and not any("ts" in e for e in events)


TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


@pytest.mark.usefixtures("no_journal")
def test_text_logs(daemon_factory: Factory) -> None:
    d = daemon_factory()
    exercise(d)
    lines = d.log().splitlines()
    assert lines and all(TIMESTAMP.match(line) for line in lines), lines
    failed = [line for line in lines if "rpc=GetRegion region=missing" in line]
    assert len(failed) == 1
    assert "level=WARNING" in failed[0] and "status=NOT_FOUND" in failed[0]
    assert "region=missing" in failed[0] and "duration_ms=" in failed[0]


def test_text_logs_under_journald(daemon_factory: Factory) -> None:
    d = daemon_factory(env={"JOURNAL_STREAM": JOURNAL_IS_LOG})
    exercise(d)
    lines = journal_entries(d.log())
    assert lines and all(line.startswith("level=") for line in lines), lines
    assert not any(TIMESTAMP.search(line) for line in lines)


# --------------------------------------------------------------------------- memplug status


def test_memplug_status(daemon_factory: Factory, hugetlb_pool: Callable[[int], None]) -> None:
    hugetlb_pool(2)
    d = daemon_factory("--max-bytes", "64M")
    d.stub.CreateRegion(pb.CreateRegionRequest(name="st0", size=16 * MiB, backing=pb.BACKING_SHMEM))
    d.plug("st0", 0, 8 * MiB)

    out = memplug(d, "status")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert re.search(rf"^memplugd {re.escape(__version__)}, up \d\d:\d\d:\d\d, ", text, re.M)
    assert re.search(r"^\s+regions:\s+1$", text, re.M), text
    assert re.search(r"^\s+plugged:\s+8 MiB of 64 MiB \(12%\)$", text, re.M), text
    assert re.search(r"^\s+hugetlb\s+2 MiB: 2 free of 2 ", text, re.M), text

    out = memplug(d, "status", "--json")
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["version"] == __version__
    assert 0 <= st["uptime_seconds"] < 600
    assert st["regions"] == 1
    assert st["plugged_bytes"] == 8 * MiB
    assert st["quota_bytes"] == 64 * MiB
    pools = {p["page_size"]: p for p in st["hugetlb_pools"]}
    assert pools[HUGE_2M]["total"] == 2 and pools[HUGE_2M]["free"] == 2
    assert st["socket"] == str(d.socket) and st["fd_socket"] == str(d.fd_socket)
