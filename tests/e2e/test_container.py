"""The container image, built and run with podman: memplugd as a sidecar on a socket volume.

No registry is reachable from CI, so the base image is made here: a Debian
bookworm with python3-venv (debootstrap, from the mirror apt uses), imported
into a podman store of this test's own under /var/tmp/memplug-podman and kept
there between runs. The image is then built from the Dockerfile with the
host's CA bundle as the build secret "ca" (TLS to PyPI may be intercepted).

Each profile runs the daemon container with the socket directory bind-mounted
from the host; a client on the host creates, plugs, attaches (fd socket, same
directory) and maps a region, writes and reads it back; then the container is
stopped and must exit 0. The "compose" profile runs the daemon and the app
exactly as examples/compose.yaml configures them (capabilities, read-only root,
users and groups), the app in a second container.

Marked `container`: `make test` skips it, .ci/run runs it. Podman here needs
runc (crun refuses this kind of host's mixed cgroups) and rlimits it may set,
both given in a CONTAINERS_CONF file of the test's own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import HUGE_2M, MiB, require, require_root

from memplug.client import Client
from memplug.client.attach import Attachment, redeem
from memplug.client.errors import MemplugError
from memplug.common import memory

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "examples" / "compose.yaml"
STORE = Path("/var/tmp/memplug-podman")  # kept between runs: the base image is slow to make
RUNROOT = Path("/run/memplug-podman")
BASE = "localhost/memplug-base:bookworm"
IMAGE = "localhost/memplug:test"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
FALLBACK_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"  # Python 3.11, as the project requires
PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
SOCKET = "/run/memplug/memplug.sock"
HEALTH = ["memplug", "--socket", SOCKET, "health"]
PATTERN = bytes(range(256)) * 4096  # 1 MiB


# --------------------------------------------------------------------------- podman


@dataclass(frozen=True)
class Podman:
    """podman on the test's own store and configuration; every call time-boxed."""

    env: dict[str, str]

    def argv(self, *args: str) -> list[str]:
        return ["podman", "--root", str(STORE / "storage"), "--runroot", str(RUNROOT), *args]

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True, stdin: Any = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = self.argv(*args)
        try:
            out = subprocess.run(
                cmd,
                env=self.env,
                stdin=stdin,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            output = f"{exc.stdout!r}\n{exc.stderr!r}"
            pytest.fail(f"{' '.join(cmd)}: no answer in {timeout} s\n{output}")
        if check and out.returncode != 0:
            pytest.fail(
                f"{' '.join(cmd)} exited with {out.returncode}\n"
                f"stdout:\n{out.stdout[-4000:]}\nstderr:\n{out.stderr[-4000:]}"
            )
        return out


def rlimits() -> dict[str, int]:
    """Limits runc may set without CAP_SYS_RESOURCE: no more than this process has.

    podman's own defaults (1048576 open files, and as many processes) exceed
    the hard limits of a sandboxed root and make runc fail with EPERM; nproc is
    also capped by pid_max, which podman applies.
    """
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    cap = 1 << 20
    return {
        "nofile": min(cap if nofile == resource.RLIM_INFINITY else nofile, cap),
        "nproc": min(cap if nproc == resource.RLIM_INFINITY else nproc, pid_max, cap),
    }


def write_conf(path: Path) -> None:
    limits = rlimits()
    ulimits = ", ".join(f'"{k}={v}:{v}"' for k, v in limits.items())
    path.write_text(
        "# Written by tests/e2e/test_container.py\n"
        "[containers]\n"
        f"default_ulimits = [{ulimits}]\n"
        "[engine]\n"
        'runtime = "runc"\n'
    )


def debian_mirror() -> str:
    """The mirror apt uses for the main Debian archive (one-line or deb822 sources)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file() or path.suffix not in ("", ".list", ".sources"):
            continue
        text = path.read_text(errors="replace")
        for m in re.finditer(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if m.group(2) == SUITE:
                return m.group(1).rstrip("/")
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {
                k.strip().lower(): v.strip()
                for k, v in re.findall(r"^([A-Za-z-]+):(.*)$", stanza, re.M)
            }
            if (
                "deb" in fields.get("types", "").split()
                and SUITE in fields.get("suites", "").split()
            ):
                return fields.get("uris", FALLBACK_MIRROR).split()[0].rstrip("/")
    return FALLBACK_MIRROR


def make_base(podman: Podman) -> None:
    """debootstrap a minimal bookworm and import it as BASE."""
    rootfs = STORE / "rootfs.tmp"
    shutil.rmtree(rootfs, ignore_errors=True)
    mirror = debian_mirror()
    try:
        out = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={PACKAGES}",
                SUITE,
                str(rootfs),
                mirror,
            ],
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        if out.returncode != 0:
            pytest.fail(f"debootstrap from {mirror} failed:\n{out.stdout[-3000:]}\n{out.stderr}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            podman("import", "-", BASE, stdin=tar.stdout, timeout=600)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            assert tar.wait(timeout=60) == 0
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    require_root("rootful podman, bind mounts and the host's sockets")
    for tool in ("podman", "runc", "debootstrap", "tar"):
        require(shutil.which(tool) is not None, f"{tool} is not installed (see .ci/run)")
    (STORE / "conf").mkdir(parents=True, exist_ok=True)
    RUNROOT.mkdir(parents=True, exist_ok=True)
    conf = STORE / "conf" / "containers.conf"
    write_conf(conf)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERS_")}
    p = Podman({**env, "CONTAINERS_CONF": str(conf)})
    if p("image", "exists", BASE, check=False).returncode != 0:
        make_base(p)
    yield p
    # Keep the base image (the cache); drop what this run built.
    p("rmi", "-f", IMAGE, check=False)
    p("image", "prune", "-f", check=False, timeout=300)


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    secret = ["--secret", f"id=ca,src={CA_BUNDLE}"] if CA_BUNDLE.is_file() else []
    started = time.monotonic()
    podman(
        "build",
        "--pull=never",
        "--format=docker",  # OCI images have no HEALTHCHECK
        "--build-arg",
        f"BASE={BASE}",
        *secret,
        "-t",
        IMAGE,
        str(ROOT),
        timeout=1200,
    )
    print(f"podman build: {time.monotonic() - started:.0f} s")
    return IMAGE


# --------------------------------------------------------------------------- helpers


def logs(podman: Podman, cid: str) -> str:
    out = podman("logs", cid, check=False)
    return out.stdout + out.stderr


def healthcheck(podman: Podman, cid: str) -> str | None:
    """Run the image's HEALTHCHECK (`memplug health` in the container) once: None if healthy."""
    out = podman("healthcheck", "run", cid, check=False, timeout=60)
    if out.returncode == 0:
        return None
    health = podman("inspect", "--format", "{{json .State.Health}}", cid).stdout
    return f"healthcheck: {out.stdout}{out.stderr}\n{health}\n{logs(podman, cid)}"


def wait_serving(podman: Podman, cid: str, socket: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = podman("inspect", "--format", "{{.State.Status}}", cid).stdout.strip()
        if state != "running":
            pytest.fail(f"the daemon container is {state}:\n{logs(podman, cid)}")
        try:
            with Client(socket, timeout=2) as c:
                if c.health() == "SERVING":
                    return
        except MemplugError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(
                f"memplugd in {cid[:12]} did not serve in {timeout} s:\n{logs(podman, cid)}"
            )
        time.sleep(0.2)


@contextlib.contextmanager
def daemon_container(
    podman: Podman, image: str, sockdir: Path, run_args: list[str], cmd: list[str]
) -> Iterator[str]:
    """The daemon container with sockdir as its /run/memplug; removed on the way out."""
    cid = podman(
        "run",
        "-d",
        "--network=none",
        "--health-interval=disable",  # no systemd timers here; `podman healthcheck run` works
        "-v",
        f"{sockdir}:/run/memplug",
        *run_args,
        image,
        *cmd,
    ).stdout.strip()
    try:
        wait_serving(podman, cid, sockdir / "memplug.sock")
        yield cid
    finally:
        podman("rm", "-f", "-t", "0", cid, check=False, timeout=60)


def stop_cleanly(podman: Podman, cid: str, sockdir: Path) -> str:
    """podman stop (SIGTERM); the daemon must exit 0 and say so."""
    podman("stop", "-t", "30", cid, timeout=90)
    code = podman("inspect", "--format", "{{.State.ExitCode}}", cid).stdout.strip()
    text = logs(podman, cid)
    assert code == "0", text
    assert "logger=memplug.server stopped" in text or '"msg": "stopped"' in text, text
    assert "Traceback" not in text, text
    assert not (sockdir / "memplug.sock").exists()  # the daemon removed its socket
    return text


def map_and_check(client: Client, sockdir: Path, name: str) -> None:
    """Attach through the host's view of the fd socket, write, read back from a second fd."""
    ticket = client.ticket(name)
    assert ticket.fd_socket == "/run/memplug/fd.sock"  # the daemon's own view of it
    fd, info = redeem(str(sockdir / "fd.sock"), ticket.ticket)
    with Attachment(fd, info, plugged=ticket.region.plugged) as mem:
        assert mem.view is not None
        mem.view[: len(PATTERN)] = PATTERN
        mem.view[-len(PATTERN) :] = PATTERN[::-1]
    # A second hand-off sees what the first wrote: the memory is the daemon's.
    ticket = client.ticket(name, "ro")
    fd, info = redeem(str(sockdir / "fd.sock"), ticket.ticket)
    with Attachment(fd, info, plugged=ticket.region.plugged) as mem:
        assert mem.view is not None and mem.view.readonly
        assert mem.view[: len(PATTERN)] == PATTERN
        assert mem.view[-len(PATTERN) :] == PATTERN[::-1]


def exercise(sockdir: Path, *, backing: str = "shmem", lock: bool = False) -> None:
    with Client(sockdir / "memplug.sock") as c:
        st = c.status()
        assert st.socket == SOCKET and st.fd_socket == "/run/memplug/fd.sock"
        name = f"side-{backing}"
        page = HUGE_2M if backing == "hugetlb" else 0
        size = 4 * MiB if backing == "hugetlb" else 16 * MiB  # hugetlb: 2 pages of a shared pool
        c.create_region(name, size, backing, page_size=page, lock=lock)
        result = c.plug(name)
        assert result.bytes == size
        assert c.get_region(name).allocated_bytes == size
        map_and_check(c, sockdir, name)
        c.delete_region(name)
        assert c.status().regions == 0


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def compose_run_args(svc: dict[str, Any]) -> list[str]:
    """The podman run flags for what a compose service sets about privileges and users."""
    known = {
        "build", "image", "command", "entrypoint", "volumes", "healthcheck", "restart",
        "depends_on", "network_mode", "cap_drop", "cap_add", "security_opt", "read_only",
        "user", "group_add", "environment",
    }  # fmt: skip
    assert set(svc) <= known, f"the test does not translate {set(svc) - known}"
    args: list[str] = []
    for cap in svc.get("cap_drop", []):
        args += ["--cap-drop", cap]
    for cap in svc.get("cap_add", []):
        args += ["--cap-add", cap]
    for opt in svc.get("security_opt", []):
        args += ["--security-opt", opt.replace(":true", "")]
    if svc.get("read_only"):
        args.append("--read-only")
    if "user" in svc:
        args += ["--user", svc["user"]]
    for group in svc.get("group_add", []):
        args += ["--group-add", str(group)]
    for key, value in (svc.get("environment") or {}).items():
        args += ["--env", f"{key}={value}"]
    return args


# --------------------------------------------------------------------------- the tests


def test_image(podman: Podman, image: str) -> None:
    (info,) = json.loads(podman("image", "inspect", image).stdout)
    config = info["Config"]
    assert config["Entrypoint"] == ["memplugd"]
    cmd = config["Cmd"]
    assert cmd[cmd.index("--socket") + 1] == SOCKET
    assert cmd[cmd.index("--fd-socket") + 1] == "/run/memplug/fd.sock"
    assert cmd[cmd.index("--state-dir") + 1] == "/var/lib/memplug"
    assert "/run/memplug" in config["Volumes"]
    healthcheck = config.get("Healthcheck") or info.get("Healthcheck") or {}
    assert healthcheck.get("Test") == ["CMD", *HEALTH], info
    assert any(e.startswith("PATH=/opt/memplug/bin:") for e in config["Env"])
    assert not any("PIP_CERT" in e for e in config["Env"])
    # Neither the CA secret nor the sources stayed in the image.
    out = podman(
        "run", "--rm", "--network=none", "--entrypoint", "sh", image, "-c",
        "test ! -e /run/secrets/ca && test ! -e /src && memplugd --version && id memplug",
    )  # fmt: skip
    assert "memplugd" in out.stdout and "uid=10001(memplug)" in out.stdout, out.stdout


@pytest.mark.parametrize("profile", ["root", "nonroot"])
def test_sidecar(
    podman: Podman,
    image: str,
    tmp_path: Path,
    hugetlb_pool: Callable[[int], None],
    profile: str,
) -> None:
    """The image as documented: plain (root), or `--user memplug` with two capabilities."""
    run_args = {
        "root": [],
        "nonroot": ["--user", "memplug", "--cap-add", "CHOWN", "--cap-add", "DAC_OVERRIDE"],
    }[profile]
    sockdir = tmp_path / "run"
    sockdir.mkdir(mode=0o700)  # root's: the non-root daemon needs DAC_OVERRIDE for it
    with daemon_container(podman, image, sockdir, run_args, []) as cid:
        # The image's HEALTHCHECK (`memplug health` inside the container), as the
        # container's user: checked last, so a failure there hides nothing else.
        unhealthy = healthcheck(podman, cid)
        user = podman("exec", cid, "id", "-u").stdout.strip()
        assert user == ("0" if profile == "root" else "10001")
        exercise(sockdir)
        if profile == "root":
            pool = memory.huge_pool(HUGE_2M)
            hugetlb_pool(pool.total - pool.free + 8)  # 8 free pages, whatever others hold
            exercise(sockdir, backing="hugetlb")
        stop_cleanly(podman, cid, sockdir)
        assert unhealthy is None, unhealthy


def test_compose_services(podman: Podman, image: str, tmp_path: Path) -> None:
    """examples/compose.yaml's daemon and app, as it configures them, on one socket volume."""
    services = compose_services()
    daemon, app = services["memplugd"], services["app"]
    sockdir, state = tmp_path / "run", tmp_path / "state"
    sockdir.mkdir(mode=0o755)
    state.mkdir(mode=0o700)
    run_args = [*compose_run_args(daemon), "-v", f"{state}:/var/lib/memplug"]
    with daemon_container(podman, image, sockdir, run_args, daemon["command"]) as cid:
        assert (unhealthy := healthcheck(podman, cid)) is None, unhealthy
        caps = podman("exec", cid, "grep", "CapEff", "/proc/1/status").stdout.split()[1]
        # CHOWN (bit 0), DAC_OVERRIDE (1), IPC_LOCK (14) and nothing else
        assert int(caps, 16) == (1 << 0) | (1 << 1) | (1 << 14), caps
        # The gRPC socket belongs to the memplug group (gid 10001), as the app expects.
        assert (sockdir / "memplug.sock").stat().st_gid == 10001
        exercise(sockdir, lock=True)
        # The app: uid 1000 in group 10001, read-only socket volume, no capabilities.
        volume = [v for v in app["volumes"] if v.split(":")[1] == "/run/memplug"]
        assert len(volume) == 1 and volume[0].endswith(":ro")
        entrypoint = app["entrypoint"]
        out = podman(
            "run",
            "--rm",
            "--network=none",
            *compose_run_args(app),
            "-v",
            f"{sockdir}:/run/memplug:ro",
            "--entrypoint",
            entrypoint[0],
            image,
            *entrypoint[1:],
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, (out.stdout, out.stderr, logs(podman, cid))
        assert "plugged, mapped and written" in out.stdout
        with Client(sockdir / "memplug.sock") as c:
            assert c.list_regions() == []  # the app deleted its region
        text = stop_cleanly(podman, cid, sockdir)
        assert "uid=1000" in text  # the daemon saw the app's own uid on the fd socket


def test_client_attach_through_a_bind_mount(podman: Podman, image: str, tmp_path: Path) -> None:
    sockdir = tmp_path / "run"
    sockdir.mkdir(mode=0o700)
    with daemon_container(podman, image, sockdir, [], []) as cid:
        try:
            with Client(sockdir / "memplug.sock") as c:
                c.create_region("bind0", 4 * MiB)
                c.plug("bind0")
                with c.attach("bind0") as mem:
                    assert mem.view is not None
                    mem.view[:5] = b"hello"
        finally:
            stop_cleanly(podman, cid, sockdir)


def region_sums(client: Client, sockdir: Path, names: list[str]) -> dict[str, str]:
    """sha256 of each region's whole contents, read through a read-only hand-off."""
    out = {}
    for name in names:
        ticket = client.ticket(name, "ro")
        fd, info = redeem(str(sockdir / "fd.sock"), ticket.ticket)
        with Attachment(fd, info, plugged=ticket.region.plugged) as mem:
            assert mem.view is not None
            out[name] = hashlib.sha256(mem.view).hexdigest()
    return out


def test_sidecar_upgrade_takes_the_regions_over(
    podman: Podman, image: str, tmp_path: Path, hugetlb_pool: Callable[[int], None]
) -> None:
    """A new container with `memplugd --takeover=auto` on the same socket and state
    volumes takes every region over from the running one, which exits 0."""
    sockdir, state = tmp_path / "run", tmp_path / "state"
    sockdir.mkdir(mode=0o700)
    state.mkdir(mode=0o700)
    (info,) = json.loads(podman("image", "inspect", image).stdout)
    cmd = [*info["Config"]["Cmd"], "--takeover=auto"]  # the image's flags, plus auto
    run_args = ["-v", f"{state}:/var/lib/memplug"]
    pool = memory.huge_pool(HUGE_2M)
    hugetlb_pool(pool.total - pool.free + 4)  # 4 free pages, whatever others hold
    with daemon_container(podman, image, sockdir, run_args, cmd) as old:
        assert "no memplugd runs" in logs(podman, old)  # the first one starts afresh
        with Client(sockdir / "memplug.sock") as c:
            c.create_region("up-shm", 16 * MiB)
            c.create_region("up-huge", 4 * MiB, "hugetlb", page_size=HUGE_2M)
            for name in ("up-shm", "up-huge"):
                c.plug(name)
                map_and_check(c, sockdir, name)
            before = c.list_regions()
            sums = region_sums(c, sockdir, ["up-shm", "up-huge"])
        # A taker that dies once the old daemon has let go: the old one, PID 1 of its
        # container, re-executes itself on the fds it kept and serves every region.
        killed = podman(
            "run", "-d", "--network=none", "--health-interval=disable",
            "--env", "MEMPLUG_TAKEOVER_KILL_AFTER_COMMITTED=1",
            "-v", f"{sockdir}:/run/memplug", *run_args, image, *cmd,
        ).stdout.strip()  # fmt: skip
        try:
            code = podman("wait", killed, timeout=60).stdout.strip()
            assert code == "137", logs(podman, killed)
        finally:
            podman("rm", "-f", "-t", "0", killed, check=False, timeout=60)
        wait_serving(podman, old, sockdir / "memplug.sock")
        assert "ended before it served" in logs(podman, old), logs(podman, old)
        with Client(sockdir / "memplug.sock") as c:
            assert c.list_regions() == before
            assert region_sums(c, sockdir, ["up-shm", "up-huge"]) == sums
        with daemon_container(podman, image, sockdir, run_args, cmd) as new:
            code = podman("wait", old, timeout=60).stdout.strip()
            assert code == "0", logs(podman, old)
            assert "handed 2 regions over" in logs(podman, old), logs(podman, old)
            wait_serving(podman, new, sockdir / "memplug.sock")
            assert "took 2 region fds over" in logs(podman, new), logs(podman, new)
            with Client(sockdir / "memplug.sock") as c:
                assert c.list_regions() == before
                assert region_sums(c, sockdir, ["up-shm", "up-huge"]) == sums
                c.delete_region("up-huge")
                c.delete_region("up-shm")
            stop_cleanly(podman, new, sockdir)
