"""The deployment files: Kubernetes manifests against the API's schemas, compose by structure.

Every document in deploy/kubernetes/ is walked against the model class of its
apiVersion and kind from the `kubernetes` client (V1DaemonSet, V1Pod, ...):
each key must be a field of the model (by its JSON name in attribute_map), each
value of the type openapi_types gives it, and each object is then built as the
model itself, which refuses a missing required field (ValueError). No cluster
is needed. Resource quantities must be strings ("100m", "1Gi"), as the client's
models type them.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml
from kubernetes.client import models

from memplug.daemon.config import parser

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "examples" / "compose.yaml"
SOCKET_DIR = "/run/memplug"
HEALTH = ["memplug", "--socket", f"{SOCKET_DIR}/memplug.sock", "health"]

LIST_RE = re.compile(r"(?:list|List)\[(.+)\]")
DICT_RE = re.compile(r"(?:dict\(str, (.+)\)|Dict\[str, (.+)\])")


class ManifestError(ValueError):
    pass


def model_class(api_version: str, kind: str) -> type[Any]:
    """apps/v1 DaemonSet -> V1DaemonSet, v1 Pod -> V1Pod, batch/v1 Job -> V1Job."""
    version = api_version.rsplit("/", 1)[-1]
    name = version[0].upper() + version[1:] + kind
    cls = getattr(models, name, None)
    if cls is None or not hasattr(cls, "openapi_types"):
        raise ManifestError(f"no model {name} for apiVersion {api_version!r} kind {kind!r}")
    return cls  # type: ignore[no-any-return]


def _is_pydantic(cls: type[Any]) -> bool:
    return hasattr(cls, "model_fields")


def build(cls: type[Any], kwargs: dict[str, Any]) -> Any:
    """Construct the model with client-side validation on: missing required fields raise."""
    if _is_pydantic(cls):  # kubernetes >= 35: pydantic models validate on construction
        return cls(**kwargs)
    config = kubernetes.client.Configuration()
    config.client_side_validation = True
    return cls(**kwargs, local_vars_configuration=config)


def check(value: Any, type_name: str, where: str) -> Any:
    """Check value against an openapi_types string; returns what to pass to the model."""
    if value is None:
        return None
    if m := LIST_RE.fullmatch(type_name):
        if not isinstance(value, list):
            raise ManifestError(f"{where}: expected a list, got {type(value).__name__}")
        return [check(v, m.group(1), f"{where}[{i}]") for i, v in enumerate(value)]
    if m := DICT_RE.fullmatch(type_name):
        if not isinstance(value, dict):
            raise ManifestError(f"{where}: expected a mapping, got {type(value).__name__}")
        inner = m.group(1) or m.group(2)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ManifestError(f"{where}: key {k!r} is not a string")
            out[k] = check(v, inner, f"{where}.{k}")
        return out
    scalar: dict[str, tuple[type[Any], ...]] = {
        "str": (str,),
        "int": (int,),
        "float": (int, float),
        "bool": (bool,),
        "bytes": (str, bytes),
        "datetime": (str, datetime.datetime),
        "date": (str, datetime.date),
    }
    if type_name in scalar:
        wanted = scalar[type_name]
        if isinstance(value, bool) and bool not in wanted:  # YAML's yes/true is no int
            raise ManifestError(f"{where}: expected {type_name}, got a boolean")
        if not isinstance(value, wanted):
            raise ManifestError(f"{where}: expected {type_name}, got {type(value).__name__}")
        return value
    if type_name == "object":  # IntOrString and free-form fields
        return value
    cls = getattr(models, type_name, None)
    if cls is None or not hasattr(cls, "openapi_types"):
        raise ManifestError(f"{where}: the schema names an unknown type {type_name!r}")
    return walk(value, cls, where)


def walk(data: Any, cls: type[Any], where: str) -> Any:
    """Validate a mapping against model cls, recursively; returns the built model."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a {cls.__name__} mapping, got {data!r}")
    attrs = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in attrs:
            known = ", ".join(sorted(attrs))
            raise ManifestError(f"{where}.{key}: not a field of {cls.__name__} (fields: {known})")
        attr = attrs[key]
        kwargs[attr] = check(value, cls.openapi_types[attr], f"{where}.{key}")
    try:
        return build(cls, kwargs)
    except (ValueError, TypeError) as exc:
        raise ManifestError(f"{where}: not a valid {cls.__name__}: {exc}") from exc


def validate(doc: Any, where: str = "") -> Any:
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        raise ManifestError(f"{where}: a manifest needs apiVersion and kind")
    cls = model_class(doc["apiVersion"], doc["kind"])
    return walk(doc, cls, where or doc["kind"])


def documents() -> Iterator[tuple[str, dict[str, Any]]]:
    files = sorted(MANIFESTS.glob("*.yaml")) + sorted(MANIFESTS.glob("*.yml"))
    for path in files:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                yield f"{path.name}#{i}", doc


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


# --------------------------------------------------------------------------- the validator


DAEMONSET_SNIPPET = """
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: x}
spec:
  selector: {matchLabels: {app: x}}
  template:
    metadata: {labels: {app: x}}
    spec:
      containers:
        - name: x
          image: x
          volumeMounts: [{name: run, mountPath: /run/memplug}]
      volumes:
        - name: run
          hostPath: {path: /run/memplug, type: DirectoryOrCreate}
"""


def snippet() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(DAEMONSET_SNIPPET)
    return doc


def test_validator_accepts_a_good_manifest() -> None:
    ds = validate(snippet())
    assert ds.spec.template.spec.volumes[0].host_path.path == "/run/memplug"


def test_validator_rejects_a_typo() -> None:
    doc = snippet()
    volume = doc["spec"]["template"]["spec"]["volumes"][0]
    volume["hostPth"] = volume.pop("hostPath")
    with pytest.raises(ManifestError, match=r"volumes\[0\]\.hostPth: not a field of V1Volume"):
        validate(doc)


def test_validator_rejects_a_typo_at_the_top() -> None:
    doc = snippet()
    doc["metdata"] = doc.pop("metadata")
    with pytest.raises(ManifestError, match="metdata: not a field of V1DaemonSet"):
        validate(doc)


def test_validator_rejects_a_wrong_type() -> None:
    doc = snippet()
    doc["spec"]["minReadySeconds"] = "10"
    with pytest.raises(ManifestError, match="minReadySeconds: expected int, got str"):
        validate(doc)
    doc["spec"]["minReadySeconds"] = True
    with pytest.raises(ManifestError, match="minReadySeconds: expected int, got a boolean"):
        validate(doc)
    doc = snippet()
    doc["spec"]["template"]["spec"]["containers"][0]["args"] = "--socket /x"
    with pytest.raises(ManifestError, match=r"containers\[0\]\.args: expected a list"):
        validate(doc)


def test_validator_rejects_a_missing_required_field() -> None:
    doc = snippet()
    del doc["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ManifestError, match=r"containers\[0\]: not a valid V1Container"):
        validate(doc)
    doc = snippet()
    del doc["spec"]["selector"]
    with pytest.raises(ManifestError, match=r"DaemonSet\.spec: not a valid V1DaemonSetSpec"):
        validate(doc)


def test_validator_rejects_an_unknown_kind() -> None:
    with pytest.raises(ManifestError, match="no model V1DeamonSet"):
        validate({**snippet(), "kind": "DeamonSet"})


# --------------------------------------------------------------------------- the manifests


def test_every_manifest_is_valid() -> None:
    found = list(documents())
    assert {doc["kind"] for _, doc in found} >= {"DaemonSet", "Pod"}
    for where, doc in found:
        validate(doc, where)


def _volumes(pod_spec: Any) -> dict[str, Any]:
    return {v.name: v for v in pod_spec.volumes}


def test_daemonset() -> None:
    (doc,) = by_kind("DaemonSet")
    ds = validate(doc)
    pod = ds.spec.template.spec
    assert ds.spec.selector.match_labels.items() <= ds.spec.template.metadata.labels.items()
    (ctr,) = pod.containers
    volumes = _volumes(pod)
    mounts = {m.mount_path: volumes[m.name] for m in ctr.volume_mounts}
    assert mounts[SOCKET_DIR].host_path.path == SOCKET_DIR
    assert mounts["/var/lib/memplug"].host_path is not None
    args = ctr.args
    assert args[args.index("--socket") + 1] == f"{SOCKET_DIR}/memplug.sock"
    assert args[args.index("--fd-socket") + 1] == f"{SOCKET_DIR}/fd.sock"
    sc = ctr.security_context
    assert sc.capabilities.drop == ["ALL"]
    assert set(sc.capabilities.add) == {"CHOWN", "DAC_OVERRIDE", "IPC_LOCK"}
    assert sc.allow_privilege_escalation is False and not sc.privileged
    limits, requests = ctr.resources.limits, ctr.resources.requests
    assert limits["hugepages-2Mi"] == requests["hugepages-2Mi"]  # the API requires it
    assert "memory" in limits or "cpu" in limits  # ... and hugepages need one of these
    # The node's daemon answers on the shared socket: live.
    probe = ctr.liveness_probe
    assert probe is not None
    # The exec action is var_exec in pydantic models (kubernetes >= 35), _exec before.
    action = getattr(probe, "var_exec", None) or getattr(probe, "_exec", None)
    assert action is not None and action.command == HEALTH


def test_daemonset_rolling_update_takes_the_regions_over() -> None:
    """The new pod starts beside the old one and takes its regions over."""
    (doc,) = by_kind("DaemonSet")
    ds = validate(doc)
    rolling = ds.spec.update_strategy.rolling_update
    assert ds.spec.update_strategy.type == "RollingUpdate"
    assert (rolling.max_surge, rolling.max_unavailable) == (1, 0)
    pod = ds.spec.template.spec
    (ctr,) = pod.containers
    args = ctr.args
    assert "--takeover=auto" in args
    assert args[args.index("--after-handover") + 1] == "wait"
    # Both pods share the socket directory and the state dir on the node, as one uid.
    volumes = _volumes(pod)
    mounts = {m.mount_path: volumes[m.name] for m in ctr.volume_mounts}
    state = args[args.index("--state-dir") + 1]
    assert mounts[SOCKET_DIR].host_path.path == SOCKET_DIR
    assert mounts[state].host_path.path == state
    assert ctr.security_context.run_as_user == 0
    # Ready only once this pod's own daemon serves, on its own metrics port: the
    # shared socket answers for the old daemon while the take-over is pending.
    port = next(p for p in ctr.ports if p.name == "metrics")
    metrics = args[args.index("--metrics") + 1]
    assert metrics.endswith(f":{port.container_port}")
    for probe in (ctr.startup_probe, ctr.readiness_probe):
        assert probe is not None and probe.http_get is not None
        assert (probe.http_get.path, probe.http_get.port) == ("/metrics", "metrics")
    # Every flag the container passes is one memplugd accepts.
    parsed = parser().parse_args(args)
    assert (parsed.takeover, parsed.after_handover) == ("auto", "wait")


def test_app_pod_reaches_the_daemon() -> None:
    (ds_doc,) = by_kind("DaemonSet")
    (doc,) = by_kind("Pod")
    pod = validate(doc)
    (ctr,) = pod.spec.containers
    volumes = _volumes(pod.spec)
    (mount,) = [m for m in ctr.volume_mounts if m.mount_path == SOCKET_DIR]
    assert volumes[mount.name].host_path.path == SOCKET_DIR
    # The same path as in the daemon's container: the fd socket the daemon
    # names in a ticket is where the app finds it.
    env = {e.name: e.value for e in ctr.env or []}
    assert env.get("MEMPLUG_SOCKET", f"{SOCKET_DIR}/memplug.sock") == f"{SOCKET_DIR}/memplug.sock"
    # Not root, but in the gRPC socket's group (memplug, gid 10001 in the image).
    args = ds_doc["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--socket-group") + 1] == "memplug"
    assert pod.spec.security_context.run_as_user != 0
    assert 10001 in pod.spec.security_context.supplemental_groups
    # The app is the compose example's app, word for word.
    compose = yaml.safe_load(COMPOSE.read_text())
    assert ctr.command == compose["services"]["app"]["entrypoint"]


# --------------------------------------------------------------------------- compose


def _mount(spec: Any) -> tuple[str, str, str]:
    """A compose volume entry, short (src:dst[:mode]) or long form -> (src, dst, mode)."""
    if isinstance(spec, str):
        parts = spec.split(":")
        assert 2 <= len(parts) <= 3, spec
        return parts[0], parts[1], parts[2] if len(parts) == 3 else "rw"
    assert isinstance(spec, dict) and {"source", "target"} <= spec.keys(), spec
    return spec["source"], spec["target"], "ro" if spec.get("read_only") else "rw"


def test_compose_shares_the_socket_volume() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(compose, dict)
    assert set(compose) <= {"name", "services", "volumes", "secrets", "networks", "configs"}
    services = compose["services"]
    assert set(services) == {"memplugd", "app"}
    declared = set(compose.get("volumes") or {})
    socket_sources: dict[str, str] = {}
    for name, svc in services.items():
        assert isinstance(svc, dict) and ("image" in svc or "build" in svc), name
        for entry in svc.get("volumes", []):
            src, dst, _mode = _mount(entry)
            if not src.startswith(("/", ".")):
                assert src in declared, f"{name}: volume {src} is not declared"
            if dst == SOCKET_DIR:
                socket_sources[name] = src
    assert set(socket_sources) == {"memplugd", "app"}
    assert socket_sources["memplugd"] == socket_sources["app"] in declared

    daemon, app = services["memplugd"], services["app"]
    cmd = daemon["command"]
    assert cmd[cmd.index("--socket") + 1] == f"{SOCKET_DIR}/memplug.sock"
    assert cmd[cmd.index("--fd-socket") + 1] == f"{SOCKET_DIR}/fd.sock"
    assert daemon["healthcheck"]["test"] == ["CMD", *HEALTH]
    assert app["depends_on"]["memplugd"]["condition"] == "service_healthy"
    assert app["image"] == daemon["image"]
    for secret in daemon["build"].get("secrets", []):
        assert secret in (compose.get("secrets") or {}), secret
