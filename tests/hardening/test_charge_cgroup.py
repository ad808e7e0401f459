"""Regions charged to a consumer's memory cgroup, on real cgroups and a real memplugd.

Each test builds, under this test process's own memory cgroup, a parent with
two children: `home`, where the daemon is moved, and `consumer`, the cgroup a
region is charged to. They are siblings, so a charge to one never shows in
the other's usage, and all of it is removed afterwards.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import DaemonProcess, MiB, create, error_class, get
from hardening_kit import (
    MemoryCgroup,
    cgroup_path,
    memory_cgroup,
    own_memory_cgroup_dir,
    record,
)
from test_state_and_metrics import free_port, scrape

from memplug.v1 import memplug_pb2 as pb

Factory = Callable[..., DaemonProcess]
MEMPLUG = Path(sys.executable).parent / "memplug"
SIZE = 256 * MiB
# What the daemon's own cgroup may gain while it serves a plug of SIZE charged
# elsewhere (its heap, gRPC buffers): far below the plug itself.
DAEMON_SLACK = SIZE // 20


@contextlib.contextmanager
def daemon_and_consumer(
    factory: Factory, consumer_limit: int | None = None, env: dict[str, str] | None = None
) -> Iterator[tuple[DaemonProcess, MemoryCgroup, MemoryCgroup, str]]:
    """(daemon moved into `home`, home, consumer, consumer's path as /proc/PID/cgroup prints it)."""
    own = own_memory_cgroup_dir()
    with (
        memory_cgroup(None, parent=own) as top,
        memory_cgroup(None, parent=top.path) as home,
        memory_cgroup(consumer_limit, parent=top.path) as consumer,
    ):
        d = factory(env=env)
        try:
            home.add(d.proc.pid)
            yield d, home, consumer, cgroup_path(consumer)
        finally:
            assert d.alive(), f"memplugd died:\n{d.log()}"
            code = d.stop()
            assert code == 0, f"memplugd exited with {code}:\n{d.log()}"
            assert "Traceback" not in d.log(), d.log()


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_plugged_memory_is_charged_to_the_named_cgroup_not_the_daemons(
    daemon_factory: Factory,
) -> None:
    port = free_port()
    with daemon_and_consumer(lambda env: daemon_factory("--metrics", str(port), env=env)) as (
        d,
        home,
        consumer,
        path,
    ):
        region = create(d, "vm", SIZE, charge_cgroup=path)
        assert region.charge_cgroup == path
        assert get(d, "vm").charge_cgroup == path
        consumer_before, home_before = consumer.usage(), home.usage()

        d.plug("vm", 0, 0)
        charged = consumer.usage() - consumer_before
        daemon_grew = home.usage() - home_before
        print(f"plug of {SIZE}: consumer +{charged}, daemon +{daemon_grew}")
        record("charge_consumer_bytes", charged, after="plug of 256 MiB")
        record("charge_daemon_bytes", daemon_grew, after="plug of 256 MiB")
        assert abs(charged - SIZE) <= SIZE * 0.02, f"consumer cgroup +{charged}, plugged {SIZE}"
        assert daemon_grew < DAEMON_SLACK, f"the daemon's cgroup grew by {daemon_grew}"

        # Discard punches and backs every block again: still the consumer's.
        d.stub.Discard(pb.RangeRequest(name="vm"))
        d.populate("vm", 0, 0, write=True)
        charged = consumer.usage() - consumer_before
        daemon_grew = home.usage() - home_before
        print(f"after discard and populate: consumer +{charged}, daemon +{daemon_grew}")
        record("charge_consumer_bytes", charged, after="discard and populate")
        record("charge_daemon_bytes", daemon_grew, after="discard and populate")
        assert abs(charged - SIZE) <= SIZE * 0.02, f"consumer cgroup +{charged} after discard"
        assert daemon_grew < DAEMON_SLACK, f"the daemon's cgroup grew by {daemon_grew}"

        text = scrape(port)
        assert f'memplug_region_charge_cgroup{{cgroup="{path}",region="vm"}} 1.0' in text, text
        env = {"MEMPLUG_SOCKET": str(d.socket), "PATH": "/usr/bin:/bin"}
        show = subprocess.run(
            [str(MEMPLUG), "show", "vm"], env=env, capture_output=True, text=True, check=True
        )
        assert f"memory cgroup {path}" in show.stdout, show.stdout
        made = subprocess.run(
            [str(MEMPLUG), "create", "cli", "64M", "--charge-cgroup", path, "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert f'"charge_cgroup": "{path}"' in made.stdout, made.stdout


def test_a_plug_beyond_the_cgroups_limit_is_refused_and_leaves_nothing(
    daemon_factory: Factory,
) -> None:
    limit = 64 * MiB
    with daemon_and_consumer(daemon_factory, consumer_limit=limit) as (d, _, consumer, path):
        create(d, "other", 64 * MiB)
        d.plug("other", 0, 0)
        create(d, "vm", SIZE, charge_cgroup=path)

        err = rpc_error(lambda: d.plug("vm", 0, 0))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        message = err.details() or ""
        assert path in message and "missing" in message, message
        assert "bytes) missing" in message and "raise that cgroup's limit" in message, message
        region = get(d, "vm")
        assert region.plugged_bytes == 0 and region.allocated_bytes == 0, region
        record("charge_refused_left_bytes", consumer.usage(), limit="64 MiB")
        assert consumer.usage() < 4 * MiB, f"the refused plug left {consumer.usage()} charged"
        assert get(d, "other").plugged_bytes == 64 * MiB
        d.plug("vm", 0, 32 * MiB)  # what fits is still served, and charged there
        assert get(d, "vm").plugged_bytes == 32 * MiB


def test_the_helper_not_the_daemon_dies_when_the_limit_is_hit_unchecked(
    daemon_factory: Factory,
) -> None:
    env = {"MEMPLUG_MEMCG_CHECK": "0"}
    with daemon_and_consumer(daemon_factory, 64 * MiB, env=env) as (d, _, consumer, path):
        create(d, "vm", SIZE, charge_cgroup=path)
        kills = consumer.oom_kills()
        err = rpc_error(lambda: d.plug("vm", 0, 0))
        record("charge_oom_kills", consumer.oom_kills() - kills, check="off")
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert consumer.oom_kills() > kills, "the limit was never reached (no OOM kill)"
        assert d.alive()
        region = get(d, "vm")
        assert region.plugged_bytes == 0 and region.allocated_bytes == 0, region


def test_a_removed_or_bad_charge_cgroup_is_a_clear_error(daemon_factory: Factory) -> None:
    with daemon_and_consumer(daemon_factory) as (d, _, consumer, path):
        create(d, "vm", SIZE, charge_cgroup=path)
        consumer.path.rmdir()  # the consumer's pod ended
        err = rpc_error(lambda: d.plug("vm", 0, 0))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert path in (err.details() or "") and "does not exist" in (err.details() or "")
        assert error_class(err) == "FailedPrecondition"
        assert get(d, "vm").allocated_bytes == 0

        err = rpc_error(lambda: create(d, "gone", SIZE, charge_cgroup=path))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert path in (err.details() or "")
        for bad in (path + "/../..", "relative/path", "/a/./b"):

            def create_bad(bad: str = bad) -> pb.Region:
                return create(d, "bad", SIZE, charge_cgroup=bad)

            err = rpc_error(create_bad)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad, err.details())
        assert [r.name for r in d.stub.ListRegions(pb.ListRegionsRequest()).regions] == ["vm"]
