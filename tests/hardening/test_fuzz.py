"""Fuzzing: every request message of the API, and garbage on the fd socket.

gRPC: request strategies are built from the service's own descriptors, so
every field of every request (today's and any added later) gets values, with
field-specific edges where the name says what a field means: offsets and
lengths near 0, at block edges, at 2**64-1 and overflowing together; raw
unknown enum values; names that are empty, unicode, too long, or nearly a real
region's; paths with '..', symlinks out of the allowed dir, /proc/self/...,
/dev/zero, absolute paths outside; labels with weird keys and too many of them.

Properties, per request: never INTERNAL or UNKNOWN (nor any undocumented
code), the daemon stays alive, and a rejected request changes nothing the
daemon or the filesystem shows (ListRegions, GetStatus, the allowed dir and a
sentinel dir outside it). A request that succeeds must have done what it says
(a plug plugs the range, a FILE region's file lies inside the allowed dir) and
is then undone, so the next example starts from the same world.

fd socket: random bytes, near-miss tickets, a slow-loris sender and 1000 idle
connections; the daemon answers each with ERR or silence, never an fd, keeps
serving good attaches meanwhile and closes idle connections after ~5 s.

MEMPLUG_FUZZ_EXAMPLES changes the examples per test (default 100).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import secrets
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import (
    HUGE_2M,
    DaemonProcess,
    GiB,
    MiB,
    hugetlb_pool_of,
    require_root,
    start_daemon,
    stop_shared,
)
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from hardening_kit import (
    DOCUMENTED_CODES,
    code_of,
    details_of,
    drain,
    fd_count,
    record,
    rss_bytes,
    wait_until,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from memplug.client import Client
from memplug.v1 import memplug_pb2 as pb

pytestmark = pytest.mark.privileged

EXAMPLES = int(os.environ.get("MEMPLUG_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SERVICE = pb.DESCRIPTOR.services_by_name["Memplug"]
METHODS: list[MethodDescriptor] = list(SERVICE.methods)
ALLOW = "@ALLOW@"  # placeholders: the world's directories are known only at run time
OUTSIDE = "@OUTSIDE@"
TICKET_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")


# --------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class Fixture:
    """A region every example starts from: (re)created by restore()."""

    name: str
    size: int
    backing: str
    plugged: list[tuple[int, int]]
    path: str = ""


@dataclass
class World:
    d: DaemonProcess
    client: Client
    allow: Path
    outside: Path
    fixtures: dict[str, Fixture]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def stub(self) -> Any:
        return self.d.stub


FIXTURES = [
    Fixture("fz-shm", 64 * MiB, "shmem", [(0, 8 * MiB), (32 * MiB, 8 * MiB)]),
    Fixture("fz-file", 16 * MiB, "file", [(0, 2 * MiB)], "fz-file.img"),
    Fixture("fz-huge", 16 * MiB, "hugetlb", [(0, 4 * MiB)]),
]


def raise_nofile(want: int = 8192) -> None:
    """Room for 1000 connections here and, inherited, in the daemon."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    new_hard = hard if hard == resource.RLIM_INFINITY or hard >= want else want
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, new_hard))


def build_dirs(base: Path) -> tuple[Path, Path]:
    allow, outside = base / "allow", base / "outside"
    allow.mkdir()
    outside.mkdir()
    (outside / "victim").write_bytes(b"do not touch\n" * 4096)
    (allow / "sub").mkdir()
    (allow / "decoy.img").write_bytes(b"\0" * (4 * MiB))  # adoptable (size 0 adopts)
    (allow / "link-abs").symlink_to(outside)
    (allow / "link-rel").symlink_to("../outside")
    (allow / "link-etc").symlink_to("/etc")
    (allow / "victim-link").symlink_to(outside / "victim")
    (allow / "sub" / "up").symlink_to("../../outside/victim")
    (allow / "dev-zero").symlink_to("/dev/zero")
    (allow / "inner-link").symlink_to("decoy.img")  # stays inside: allowed
    os.mkfifo(allow / "fifo")
    return allow, outside


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_root("fuzzes a daemon with hugetlb and FILE regions")
    raise_nofile()
    base = tmp_path_factory.mktemp("fuzz")
    allow, outside = build_dirs(base)
    with contextlib.ExitStack() as stack:
        fixtures = list(FIXTURES)
        try:
            stack.enter_context(hugetlb_pool_of(8))
        except pytest.skip.Exception:
            fixtures = [f for f in fixtures if f.backing != "hugetlb"]
        d = start_daemon(base / "daemon", "--allow-dir", str(allow))
        client = Client(d.socket, timeout=30)
        w = World(d, client, allow, outside, {f.name: f for f in fixtures})
        try:
            restore(w)
            yield w
        finally:
            client.close()
            assert d.alive(), f"memplugd died during fuzzing:\n{d.log()[-4000:]}"
            code = d.stop()
            assert code == 0, f"memplugd exited with {code}:\n{d.log()[-4000:]}"


def restore(w: World) -> None:
    """Back to the fixture regions, exactly: recreate, unplug extras, plug what is missing,
    delete strangers (and the files they left in the allowed dir)."""
    c = w.client
    have = {r.name: r for r in c.list_regions()}
    for name in have:
        if name not in w.fixtures:
            c.delete_region(name)
    for f in w.fixtures.values():
        if f.name not in have:
            kwargs: dict[str, Any] = {"page_size": HUGE_2M} if f.backing == "hugetlb" else {}
            c.create_region(f.name, f.size, f.backing, path=f.path, **kwargs)
        region = c.get_region(f.name)
        for offset, length in region.plugged:
            for extra in subtract([(offset, length)], f.plugged):
                c.unplug(f.name, *extra)
        for offset, length in f.plugged:
            c.plug(f.name, offset, length)
    keep = {f.path for f in w.fixtures.values() if f.path} | set(_BUILT)
    for entry in w.allow.iterdir():
        if entry.name not in keep:
            if entry.is_dir() and not entry.is_symlink():
                continue
            entry.unlink()
    for entry in (w.allow / "sub").iterdir():
        if entry.name != "up":
            entry.unlink()


_BUILT = {"sub", "decoy.img", "link-abs", "link-rel", "link-etc", "victim-link", "dev-zero",
          "inner-link", "fifo"}  # fmt: skip


def subtract(ranges: list[tuple[int, int]], minus: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = list(ranges)
    for mo, ml in minus:
        nxt = []
        for o, n in out:
            if mo + ml <= o or o + n <= mo:
                nxt.append((o, n))
                continue
            if o < mo:
                nxt.append((o, mo - o))
            if mo + ml < o + n:
                nxt.append((mo + ml, o + n - mo - ml))
        out = nxt
    return out


def tree(root: Path) -> list[tuple[str, int, int, int]]:
    """Everything under root, without following symlinks: (path, mode, size, blocks)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = Path(dirpath) / n
            st_ = p.lstat()
            out.append((str(p.relative_to(root)), st_.st_mode, st_.st_size, st_.st_blocks))
    return sorted(out)


def snapshot(w: World, *, created_at: bool = True) -> dict[str, Any]:
    regions = MessageToDict(w.stub.ListRegions(pb.ListRegionsRequest()))
    if not created_at:
        for r in regions.get("regions", []):
            r.pop("createdAt", None)
    status = MessageToDict(w.stub.GetStatus(pb.GetStatusRequest()))
    for volatile in ("uptimeSeconds", "hugetlbPools", "warmPools"):
        status.pop(volatile, None)
    return {
        "regions": regions,
        "status": status,
        "allow": tree(w.allow),
        "outside": tree(w.outside),
    }


# --------------------------------------------------------------------------- strategies

MB2 = 2 * MiB
U64_EDGES = [0, 1, 2, 511, 512, 4095, 4096, 4097, MB2 - 1, MB2, MB2 + 1, MB2 + 4096, 4 * MiB,
             8 * MiB, 14 * MiB, 16 * MiB, 16 * MiB + MB2, 32 * MiB, 62 * MiB, 64 * MiB,
             66 * MiB, 1 << 30, (1 << 32) - 1, 1 << 32, 1 << 56, (1 << 56) + MB2, 1 << 62,
             (1 << 63) - 1, 1 << 63, (1 << 64) - MB2, (1 << 64) - 4096, (1 << 64) - 2,
             (1 << 64) - 1]  # fmt: skip
U32_EDGES = [0, 1, 2, 3, 64, 1000, 65534, 65535, (1 << 31) - 1, 1 << 31, (1 << 32) - 2,
             (1 << 32) - 1]  # fmt: skip
I32_EDGES = [-(1 << 31), -1, 0, 1, 2, 3, 4, 7, 100, (1 << 31) - 1]
ODD_NAMES = ["", "a", "A", "-a", ".a", "_a", ".", "..", "a" * 63, "a" * 64, "a" * 4096,
             "x" * 70_000, "y" * 1_100_000, "ä", "fz-shm\u0301", "a/b", "a\\b", "a\x00b",
             "a b", "vm0\n", "../fz-shm", "fz-shm ", " fz-shm", "FZ-SHM", "\u202efz-shm",
             "\U0001f600", "fz-shm\x00", "con", "%s%n", "fz-shm/..", "*", "fz-*"]  # fmt: skip
PATHS = ["", ".", "..", "/", "../outside/victim", "../../etc/passwd", "sub/../../outside/victim",
         "sub/../fz-file.img", f"{OUTSIDE}/victim", f"{OUTSIDE}/new.img", "/etc/passwd",
         "/etc/memplug-fuzz.img", "/proc/self/fd/0", "/proc/self/root/etc/passwd",
         f"/proc/self/root{OUTSIDE}/victim", "/proc/self/cwd/x.img", "/dev/zero", "/dev/null",
         "link-abs/victim", "link-abs/new.img", "link-rel/victim", "link-rel/new.img",
         "link-etc/passwd", "link-etc/memplug-fuzz.img", "victim-link", "sub/up", "dev-zero",
         "fifo", "sub", "sub/", "decoy.img", "inner-link", "fz-file.img", "new.img",
         "sub/new.img", f"{ALLOW}/new.img", f"{ALLOW}/../outside/victim", f"{ALLOW}",
         f"{ALLOW}/sub/../new.img", "a\x00b", "n" * 300, "d/" * 3000 + "x", "ü.img",
         "new.img/", "./new.img", "//new.img", "sub//new.img"]  # fmt: skip
LABEL_KEYS = ["", "a", "k", "A" * 253, "A" * 254, "ü", "a b", "/", "-x", "x/y", "a.b_c-d",
              "\x00", "k\n", "memplug.io/owner"]  # fmt: skip
LABEL_VALUES = ["", "v", "\x00", "v" * 1024, "v" * 1025, "ü" * 10, "a=b,c"]


def u64() -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from(U64_EDGES),
        st.integers(0, 40).map(lambda n: n * MB2),
        st.integers(0, (1 << 64) - 1),
    )


def u32() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(U32_EDGES), st.integers(0, (1 << 32) - 1))


def raw_enum(enum: EnumDescriptor) -> st.SearchStrategy[int]:
    known = [v.number for v in enum.values]
    return st.one_of(
        st.sampled_from(known), st.sampled_from(I32_EDGES), st.integers(-(1 << 31), (1 << 31) - 1)
    )


def text() -> st.SearchStrategy[str]:
    return st.text(max_size=40)


def names() -> st.SearchStrategy[str]:
    real = st.sampled_from([f.name for f in FIXTURES])
    return st.one_of(real, real, real, st.sampled_from(ODD_NAMES), text())


def paths() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(PATHS), text())


def labels() -> st.SearchStrategy[dict[str, str]]:
    key = st.one_of(st.sampled_from(LABEL_KEYS), st.text(max_size=20))
    value = st.one_of(st.sampled_from(LABEL_VALUES), st.text(max_size=20))
    too_many = st.sets(st.integers(0, 999), min_size=65, max_size=66).map(
        lambda keys: {f"k{k}": "v" for k in keys}
    )
    return st.one_of(st.dictionaries(key, value, max_size=4), too_many)


OVERRIDES: dict[str, Any] = {
    "name": names,
    "path": paths,
    "labels": labels,
    "label_selector": labels,
    "offset": u64,
    "length": u64,
    "size": u64,
    "page_size": lambda: st.one_of(st.sampled_from([0, 4096, MB2, 1 << 30, 3, 8192]), u64()),
    "block_size": lambda: st.one_of(st.sampled_from([0, 4096, MB2, 4 * MiB, 1 << 30, 3]), u64()),
    "numa_nodes": lambda: st.lists(st.one_of(st.sampled_from([0, 1, 63, 1024]), u32()), max_size=4),
}


def scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    if f.name in OVERRIDES and not f.is_repeated:
        strategy: st.SearchStrategy[Any] = OVERRIDES[f.name]()
        return strategy
    if f.type == FieldDescriptor.TYPE_ENUM:
        assert f.enum_type is not None
        return raw_enum(f.enum_type)
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type == FieldDescriptor.TYPE_STRING:
        return text()
    if f.type in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return u64()
    if f.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return u32()
    if f.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32):
        return st.sampled_from(I32_EDGES)
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64)
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        assert f.message_type is not None
        return messages(f.message_type)
    raise NotImplementedError(f"no strategy for field {f.full_name} (type {f.type})")


def field_strategy(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        maker = OVERRIDES.get(f.name)
        strategy: st.SearchStrategy[Any] = (
            maker() if maker else st.dictionaries(text(), text(), max_size=4)
        )
        return strategy
    if f.is_repeated:
        maker = OVERRIDES.get(f.name)
        return maker() if maker else st.lists(scalar(f), max_size=4)
    if f.has_presence:  # proto3 optional scalars and sub-messages: sometimes unset
        return st.one_of(st.none(), scalar(f))
    return scalar(f)


def messages(descriptor: Descriptor) -> st.SearchStrategy[Message]:
    cls = pb.DESCRIPTOR.message_types_by_name[descriptor.name]
    fields = {f.name: field_strategy(f) for f in descriptor.fields}

    def build(values: dict[str, Any]) -> Message:
        msg: Any = getattr(pb, cls.name)()
        for name, value in values.items():
            if value is None:
                continue
            target: Any = getattr(msg, name)
            if isinstance(value, dict):
                target.update(value)
            elif isinstance(value, list):
                target.extend(value)
            elif isinstance(value, Message):
                target.CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg  # type: ignore[no-any-return]

    return st.fixed_dictionaries(fields).map(build)


# --------------------------------------------------------------------------- calling


def place(w: World, request: Any) -> None:
    """Put the world's real directories into path placeholders."""
    if "path" in type(request).DESCRIPTOR.fields_by_name:
        request.path = request.path.replace(ALLOW, str(w.allow)).replace(OUTSIDE, str(w.outside))


def call(w: World, method: MethodDescriptor, request: Message) -> tuple[str, Any]:
    rpc = getattr(w.stub, method.name)
    try:
        if method.server_streaming:
            return "OK", drain(rpc(request, timeout=60))
        return "OK", rpc(request, timeout=60)
    except grpc.RpcError as err:
        return code_of(err), err


def plugged_of(w: World, name: str) -> list[tuple[int, int]]:
    return w.client.get_region(name).plugged


def covered(ranges: list[tuple[int, int]], offset: int, length: int) -> bool:
    return not subtract([(offset, length)], ranges)


def check_success(w: World, method: MethodDescriptor, request: Any, reply: Any) -> None:
    """What a request that succeeded must have done."""
    name = method.name
    if name in ("Plug", "Unplug"):
        # length 0 means "to the end of the region".
        length = request.length or w.client.get_region(request.name).size - request.offset
    if name == "Plug":
        assert covered(plugged_of(w, request.name), request.offset, length), (
            f"Plug said OK but {request.offset}+{length} is not all plugged"
        )
    elif name == "Unplug":
        left = plugged_of(w, request.name)
        assert subtract(left, [(request.offset, length)]) == left, (
            f"Unplug said OK but {request.offset}+{length} is still partly plugged"
        )
    elif name == "CreateRegion":
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", reply.name), reply.name
        assert reply.size > 0 and reply.size % reply.block_size == 0
        assert reply.plugged_bytes == 0
        if reply.backing == pb.BACKING_FILE:
            real = Path(os.path.realpath(reply.path))
            assert real.is_relative_to(w.allow.resolve()), f"FILE region outside: {real}"
            assert stat.S_ISREG(real.stat().st_mode)
    elif name == "Attach":
        assert TICKET_RE.fullmatch(reply.ticket), reply.ticket
        assert reply.access == request.access


def exercise(w: World, method: MethodDescriptor, request: Message) -> None:
    place(w, request)
    before = snapshot(w)
    code, result = call(w, method, request)
    w.counts[code] = w.counts.get(code, 0) + 1
    record("fuzz_codes", 1, code=code, rpc=method.name)
    assert w.d.alive(), f"memplugd died on {method.name}({request!r:.300}):\n{w.d.log()[-3000:]}"
    detail = details_of(result) if code != "OK" else ""
    assert code in DOCUMENTED_CODES | {"OK"}, (
        f"{method.name} answered {code} ({detail}) to {str(request)[:500]!r}"
    )
    if code != "OK":
        after = snapshot(w)
        assert after == before, (
            f"{method.name} was refused ({code}: {detail}) but changed the world; "
            f"request {str(request)[:500]!r}"
        )
        return
    check_success(w, method, request, result)
    restore(w)
    assert snapshot(w, created_at=False) == {**before, **_no_created(before)}, (
        f"after undoing {method.name}({str(request)[:300]!r}) the world is not as it was"
    )


def _no_created(snap: dict[str, Any]) -> dict[str, Any]:
    regions = {**snap["regions"]}
    regions["regions"] = [
        {k: v for k, v in r.items() if k != "createdAt"} for r in regions.get("regions", [])
    ]
    return {"regions": regions}


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
@FUZZ
@given(data=st.data())
def test_every_rpc(world: World, method: MethodDescriptor, data: st.DataObject) -> None:
    """Every field at random: mostly refused early (a bad name, a bad size)."""
    request = data.draw(messages(method.input_type), label=method.input_type.name)
    exercise(world, method, request)
    record("fuzz_examples", 1, target=method.name)


def valid_request(method: MethodDescriptor, data: st.DataObject) -> Any:
    """A request the daemon would accept, to mutate one field of."""
    cls: Any = getattr(pb, method.input_type.name)
    name = method.name
    if name == "CreateRegion":
        backing = data.draw(
            st.sampled_from([pb.BACKING_SHMEM, pb.BACKING_FILE, pb.BACKING_HUGETLB])
        )
        fresh = data.draw(st.from_regex(r"fz-new-[a-z0-9]{1,8}", fullmatch=True))
        path = "new.img" if backing == pb.BACKING_FILE else ""
        return cls(name=fresh, size=4 * MiB, backing=backing, path=path)
    fields = method.input_type.fields_by_name
    request = cls()
    if "name" in fields:
        request.name = "fz-shm"
    if "length" in fields:
        request.length = MB2
    if name == "Populate":
        request.mode = pb.POPULATE_MODE_READ
    if name == "Attach":
        request.access = pb.ACCESS_READ_ONLY
    return request


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
@FUZZ
@given(data=st.data())
def test_every_rpc_one_field_off(
    world: World, method: MethodDescriptor, data: st.DataObject
) -> None:
    """A valid request with one or two fields fuzzed: reaches the deep checks (paths that
    leave the allowed dir, ranges at the region's end, ACLs, NUMA nodes, labels)."""
    request = valid_request(method, data)
    fields = list(method.input_type.fields)
    if fields:
        for f in data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2)):
            value = data.draw(field_strategy(f), label=f.name)
            request.ClearField(f.name)
            if value is None:
                continue
            target: Any = getattr(request, f.name)
            if isinstance(value, dict):
                target.update(value)
            elif isinstance(value, list):
                target.extend(value)
            else:
                setattr(request, f.name, value)
    exercise(world, method, request)
    record("fuzz_examples", 1, target=method.name)


CREATE = SERVICE.methods_by_name["CreateRegion"]


@FUZZ
@given(
    path=paths(),
    size=st.sampled_from([0, 4 * MiB, 3 * MiB]),
    name=st.from_regex(r"fz-path-[a-z0-9]{1,8}", fullmatch=True),
)
def test_file_region_paths(world: World, path: str, size: int, name: str) -> None:
    """FILE regions at every tricky path: inside the allowed dir or refused, never
    anything created, adopted or changed outside it (the sentinel dir is in the snapshot)."""
    request = pb.CreateRegionRequest(name=name, size=size, backing=pb.BACKING_FILE, path=path)
    exercise(world, CREATE, request)
    record("fuzz_examples", 1, target="CreateRegion(FILE path)")


# --------------------------------------------------------------------------- the fd socket


def exchange(path: Path, data: bytes, *, shut: bool, timeout: float = 10) -> tuple[bytes, int]:
    """Send data (then half-close if shut); the reply and the number of fds that came."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
            if shut:
                sock.shutdown(socket.SHUT_WR)
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 4096, 4)
        except ConnectionResetError:
            return b"", 0
    for fd in fds:
        os.close(fd)
    return msg, len(fds)


def good_attach(w: World, name: str = "fz-shm", within: float = 2.0) -> None:
    t0 = time.monotonic()
    with w.client.attach(name, "ro", map_memory=False, sparse=True) as att:
        assert os.fstat(att.fd).st_size == w.fixtures[name].size
    took = time.monotonic() - t0
    assert took < within, f"a good attach took {took:.1f} s"


@FUZZ
@given(data=st.binary(max_size=1500), newline=st.booleans(), shut=st.booleans())
def test_fd_socket_random_bytes(world: World, data: bytes, newline: bool, shut: bool) -> None:
    if not newline and not shut:
        shut = True  # an unfinished line would wait out the 5 s read timeout
    payload = data + (b"\n" if newline else b"")
    reply, nfds = exchange(world.d.fd_socket, payload, shut=shut)
    record("fd_socket_garbage", 1)
    assert nfds == 0, f"the daemon passed an fd for {payload[:80]!r}"
    assert reply == b"" or reply.startswith(b"ERR "), reply
    if reply:
        assert reply.endswith(b"\n") and reply.count(b"\n") == 1, reply
        status = reply.split(b" ", 2)[1].decode()
        assert status in ("INVALID_ARGUMENT", "PERMISSION_DENIED"), reply
    assert world.d.alive()
    good_attach(world)


@FUZZ
@given(
    cut=st.integers(0, 200),
    mutation=st.sampled_from(["prefix", "suffix", "flip", "case", "pad", "twice", "no-newline"]),
)
def test_fd_socket_near_miss_tickets(world: World, cut: int, mutation: str) -> None:
    """Tickets that are almost right get nothing, and do not burn the real one."""
    ticket = world.client.ticket("fz-shm", "ro").ticket
    cut %= len(ticket)
    wrong = {
        "prefix": ticket[:cut],
        "suffix": ticket + ticket[: cut % 8 + 1],
        "flip": ticket[:cut] + ("A" if ticket[cut] != "A" else "B") + ticket[cut + 1 :],
        "case": ticket.swapcase() if ticket.swapcase() != ticket else ticket + "x",
        "pad": " " + ticket,
        "twice": f"{ticket} {ticket}",
        "no-newline": ticket,
    }[mutation]
    line = f"MEMPLUG/1 ATTACH {wrong}".encode() + (b"" if mutation == "no-newline" else b"\n")
    reply, nfds = exchange(world.d.fd_socket, line, shut=True)
    record("fd_socket_near_miss", 1)
    assert nfds == 0, f"an fd for the near miss {line!r}"
    assert reply == b"" or reply.startswith(
        (b"ERR PERMISSION_DENIED ", b"ERR INVALID_ARGUMENT ")
    ), reply
    reply, nfds = exchange(world.d.fd_socket, f"MEMPLUG/1 ATTACH {ticket}\n".encode(), shut=False)
    assert nfds == 1 and reply.startswith(b"OK "), f"the real ticket was burnt: {reply!r}"


def test_fd_socket_slow_loris(world: World) -> None:
    """One byte every 0.5 s: the daemon hangs up after ~5 s and serves others meanwhile;
    the ticket the slow line carried was never redeemed, so it still works."""
    ticket = world.client.ticket("fz-shm", "ro").ticket
    line = f"MEMPLUG/1 ATTACH {ticket}\n".encode()
    closed_after: list[float] = []
    got_fd: list[int] = []

    def slow() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(world.d.fd_socket))
            t0 = time.monotonic()
            sock.settimeout(0.5)
            for i in range(len(line)):
                try:
                    sock.send(line[i : i + 1])
                    _, fds, _, _ = socket.recv_fds(sock, 4096, 1)
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    closed_after.append(time.monotonic() - t0)
                    return
                got_fd.extend(fds)
                closed_after.append(time.monotonic() - t0)
                return

    thread = threading.Thread(target=slow)
    thread.start()
    served = 0
    while thread.is_alive():
        good_attach(world)
        served += 1
        time.sleep(0.2)
    thread.join()
    for fd in got_fd:
        os.close(fd)
    record("fd_socket_slow_loris_served_meanwhile", served)
    assert not got_fd, "the slow connection got an fd"
    assert closed_after, "the daemon never hung up on the slow connection"
    assert 4.0 <= closed_after[0] <= 8.0, f"hung up after {closed_after[0]:.1f} s, want ~5 s"
    assert served >= 10, f"only {served} good attaches while the slow one dragged on"
    reply, nfds = exchange(world.d.fd_socket, line, shut=False)
    assert nfds == 1 and reply.startswith(b"OK "), reply


def connect_when_backlog_allows(sock: socket.socket, path: Path, timeout: float = 10) -> None:
    """A Unix socket connect fails with EAGAIN while the listen backlog is full."""
    sock.setblocking(False)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(str(path))
            break
        except BlockingIOError:
            assert time.monotonic() < deadline, "the daemon stopped accepting connections"
            time.sleep(0.001)
    sock.settimeout(10)


def test_fd_socket_thousand_idle_connections(world: World) -> None:
    pid = world.d.proc.pid
    before = fd_count(pid)
    idle: list[socket.socket] = []
    try:
        opened = time.monotonic()
        for i in range(1000):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.append(sock)
            connect_when_backlog_allows(sock, world.d.fd_socket)
            if i % 10 == 0:
                sock.sendall(b"MEMPLUG/1 ATT")  # half a line, then nothing
        wait_until(lambda: fd_count(pid) >= before + 900, 5, "the daemon to accept them all")
        record("fd_socket_idle_connections", len(idle))
        for _ in range(5):
            good_attach(world)
        for sock in idle:
            sock.settimeout(max(0.1, opened + 9.0 - time.monotonic()))
            assert sock.recv(4096) == b"", "an idle connection got an answer"
        waited = time.monotonic() - opened
        assert waited <= 9.0, f"idle connections closed only after {waited:.1f} s"
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: fd_count(pid) <= before + 2, 5, "the daemon to drop the idle fds")
    good_attach(world)


def test_fd_socket_refuses_garbage_fast(world: World) -> None:
    """A long line with no newline is cut off at 512 bytes, not read forever."""
    reply, nfds = exchange(world.d.fd_socket, secrets.token_bytes(4096), shut=False)
    assert nfds == 0
    assert reply == b"" or reply.startswith(b"ERR INVALID_ARGUMENT "), reply
    good_attach(world)


# --------------------------------------------------------------------------- huge sparse regions

SPARSE_QUOTA = 64 * MiB
THREADS_EDGES = [0, 1, 2, 3, 64, (1 << 31) - 1, 1 << 31, (1 << 32) - 1]


@pytest.fixture(scope="module")
def quota_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A daemon with a small quota: a plug of a huge sparse region must be refused, never run."""
    d = start_daemon(tmp_path_factory.mktemp("sparse"), "--max-bytes", str(SPARSE_QUOTA))
    # One refusal first, so that what the daemon loads lazily is not counted as growth.
    d.stub.CreateRegion(pb.CreateRegionRequest(name="warm", size=GiB, backing=pb.BACKING_SHMEM))
    with pytest.raises(grpc.RpcError):
        drain(d.stub.Plug(pb.PlugRequest(name="warm", offset=0, length=GiB)))
    d.stub.DeleteRegion(pb.DeleteRegionRequest(name="warm"))
    yield d
    stop_shared(d)


@FUZZ
@given(
    size_blocks=st.one_of(
        st.sampled_from([1 << 17, 1 << 27, 1 << 29, (1 << 35) - 1, 1 << 35]),
        st.integers(1, 1 << 35),
    ),
    start=st.floats(0, 1),
    span=st.floats(0, 1),
    threads=st.one_of(st.sampled_from(THREADS_EDGES), st.integers(0, (1 << 32) - 1)),
    strategy=st.sampled_from([pb.STRATEGY_AUTO, pb.STRATEGY_FALLOCATE, pb.STRATEGY_POPULATE_WRITE]),
    populate=st.booleans(),
)
@example(  # the worst case, always tried: 64 PiB with every thread a uint32 can ask for
    size_blocks=1 << 35,
    start=0.0,
    span=1.0,
    threads=(1 << 32) - 1,
    strategy=pb.STRATEGY_POPULATE_WRITE,
    populate=False,
)
def test_huge_sparse_plug_and_extreme_threads(
    quota_daemon: DaemonProcess,
    size_blocks: int,
    start: float,
    span: float,
    threads: int,
    strategy: pb.Strategy.ValueType,
    populate: bool,
) -> None:
    """Regions up to 64 PiB, any range of them, any thread count: a prompt answer, a
    documented code, and no daemon memory spent on the size of the request."""
    d = quota_daemon
    size = size_blocks * MB2
    offset = min(int(start * size_blocks), size_blocks - 1) * MB2
    length = max(1, int(span * (size_blocks - offset // MB2))) * MB2
    d.stub.CreateRegion(pb.CreateRegionRequest(name="sparse", size=size, backing=pb.BACKING_SHMEM))
    try:
        rss_before = rss_bytes(d.proc.pid)
        started = time.monotonic()
        try:
            if populate:
                request: Any = pb.PopulateRequest(
                    name="sparse",
                    offset=offset,
                    length=length,
                    mode=pb.POPULATE_MODE_WRITE,
                    threads=threads,
                )
                drain(d.stub.Populate(request, timeout=30))
            else:
                request = pb.PlugRequest(
                    name="sparse", offset=offset, length=length, threads=threads, strategy=strategy
                )
                drain(d.stub.Plug(request, timeout=30))
            code = "OK"
        except grpc.RpcError as err:
            code = code_of(err)
        seconds = time.monotonic() - started
        growth = rss_bytes(d.proc.pid) - rss_before
        assert code in DOCUMENTED_CODES | {"OK"}, (code, size, offset, length, threads)
        if length > SPARSE_QUOTA:
            assert code == "RESOURCE_EXHAUSTED" or (populate and code == "FAILED_PRECONDITION")
            # Refused before any work: no time, no memory in proportion to the size.
            assert seconds < 1.0, f"refusing {length} bytes took {seconds:.2f} s"
            assert growth < 5 * MiB, f"refusing {length} bytes grew the daemon's RSS by {growth}"
        assert d.alive(), d.log()[-4000:]
    finally:
        d.stub.DeleteRegion(pb.DeleteRegionRequest(name="sparse"))


def test_fuzz_saw_every_outcome_class(world: World) -> None:
    """Guards the fuzzer itself: it must reach acceptance, refusal and the path checks."""
    counts = world.counts
    if not counts:
        pytest.skip("checks what the fuzz tests above saw: run them first")
    assert counts.get("OK", 0) > 0, f"no request was ever accepted: {counts}"
    assert counts.get("INVALID_ARGUMENT", 0) > 0, f"no request was ever refused: {counts}"
    assert counts.get("PERMISSION_DENIED", 0) > 0, f"no path ever left the allowed dir: {counts}"
