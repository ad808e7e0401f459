"""Every Prometheus metric memplugd exports, defined in one place.

Counters and histograms are updated as things happen (RPCs, work done,
attach outcomes); the region, memory and pool gauges are read from the engine
and the kernel at scrape time, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from memplug.daemon.engine.engine import RegionEngine

REGISTRY = CollectorRegistry()

RPC_TOTAL = Counter(
    "memplug_rpc", "RPCs served, by method and status code", ["rpc", "code"], registry=REGISTRY
)
RPC_SECONDS = Histogram(
    "memplug_rpc_duration_seconds",
    "RPC latency, by method",
    ["rpc"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
WORK_BYTES = Counter(
    "memplug_work_bytes",
    "Bytes plugged or populated, by operation and strategy",
    ["op", "strategy"],
    registry=REGISTRY,
)
WORK_SECONDS = Counter(
    "memplug_work_seconds",
    "Seconds spent plugging or populating, by operation and strategy "
    "(throughput = rate(memplug_work_bytes_total) / rate(memplug_work_seconds_total))",
    ["op", "strategy"],
    registry=REGISTRY,
)
ATTACHES = Counter(
    "memplug_attach", "fd hand-offs on the fd socket, by result", ["result"], registry=REGISTRY
)


def record_work(op: str, strategy: str, nbytes: int, seconds: float) -> None:
    if nbytes:
        WORK_BYTES.labels(op, strategy).inc(nbytes)
        WORK_SECONDS.labels(op, strategy).inc(seconds)


class EngineCollector(Collector):
    """Regions, plugged and allocated bytes by backing, quota, hugetlb pools: read at scrape."""

    def __init__(self, engine: RegionEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        regions = GaugeMetricFamily("memplug_regions", "Regions, by backing", labels=["backing"])
        plugged = GaugeMetricFamily(
            "memplug_plugged_bytes", "Plugged bytes, by backing", labels=["backing"]
        )
        allocated = GaugeMetricFamily(
            "memplug_allocated_bytes",
            "Bytes the kernel has allocated to regions, by backing",
            labels=["backing"],
        )
        outside = GaugeMetricFamily(
            "memplug_allocated_outside_plugged_bytes",
            "Bytes holders of regions' fds allocated outside plugged blocks (counted by the "
            "quota), by backing",
            labels=["backing"],
        )
        usage = sorted(self.engine.usage_by_backing().items())
        for backing, (count, plug, alloc, stray) in usage:
            regions.add_metric([backing], count)
            plugged.add_metric([backing], plug)
            allocated.add_metric([backing], alloc)
            outside.add_metric([backing], stray)
        yield from (regions, plugged, allocated, outside)
        charged = GaugeMetricFamily(
            "memplug_region_charge_cgroup",
            "1 for each region whose memory is charged to a cgroup other than the daemon's",
            labels=["region", "cgroup"],
        )
        waiting = GaugeMetricFamily(
            "memplug_region_awaiting_first_attacher",
            "1 for each region charged to its first attacher (charge_to_peer) that nobody has "
            "attached yet: it cannot be plugged until then",
            labels=["region"],
        )
        for info in self.engine.list_regions():
            if info.options.charge_cgroup:
                charged.add_metric([info.name, info.options.charge_cgroup], 1)
            if info.options.awaiting_peer:
                waiting.add_metric([info.name], 1)
        yield from (charged, waiting)
        quota = GaugeMetricFamily("memplug_quota_bytes", "The --max-bytes quota (0: none)")
        quota.add_metric([], self.engine.max_bytes or 0)
        yield quota
        used = GaugeMetricFamily(
            "memplug_quota_used_bytes",
            "Bytes the quota counts: plugged, and allocated by holders outside plugged blocks",
        )
        used.add_metric([], self.engine.quota_counted)
        yield used
        pages = GaugeMetricFamily(
            "memplug_hugetlb_pages",
            "The kernel's hugetlb pools, by page size and state (total, free, reserved, surplus; "
            "added: pages memplug added for plugs, budget: the most it may add)",
            labels=["page_size", "state"],
        )
        node_pages = GaugeMetricFamily(
            "memplug_hugetlb_node_pages",
            "The kernel's hugetlb pools per NUMA node, by page size and state (as "
            "memplug_hugetlb_pages; reserved is kernel-wide)",
            labels=["page_size", "node", "state"],
        )
        for report in self.engine.hugetlb_pools():
            for state in ("total", "free", "reserved", "surplus", "added", "budget"):
                value = getattr(report, "budget_pages" if state == "budget" else state)
                if report.node is None:
                    pages.add_metric([str(report.page_size), state], value)
                else:
                    node_pages.add_metric([str(report.page_size), str(report.node), state], value)
        yield pages
        yield node_pages
