"""Prometheus metrics: a collector over the export counters and a tiny HTTP endpoint.

The collector reads ``ExportStats`` and each driver's ``statistics()`` on
scrape, so serving requests never touches prometheus objects.  Per layer it
exports the driver's counters as they are, a hit ratio for every cache that
counts hits and misses (qcow2's l2 and refblock caches), and, for a layer
copying its base in (FVD prefetch), progress, rate and state.  The endpoint
is a minimal trio HTTP/1.0 responder for ``GET /metrics``: the text itself is
produced by prometheus_client's ``generate_latest``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from nbdserve.block.prefetch import RATE_WINDOW, PrefetchState
from nbdserve.server.stats import LATENCY_BUCKETS

if TYPE_CHECKING:
    from nbdserve.block.base import DriverStatistics
    from nbdserve.server.exports import ExportRegistry

LOGGER = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MAX_REQUEST = 8192


class ExportCollector(Collector):
    def __init__(self, exports: ExportRegistry) -> None:
        self.exports = exports

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "nbdserve_requests", "NBD requests received", labels=["export", "type"]
        )
        errors = CounterMetricFamily(
            "nbdserve_errors", "Requests answered with an error", labels=["export"]
        )
        read = CounterMetricFamily("nbdserve_read_bytes", "Bytes read", labels=["export"])
        written = CounterMetricFamily("nbdserve_written_bytes", "Bytes written", labels=["export"])
        inflight = GaugeMetricFamily(
            "nbdserve_inflight_requests", "Requests being handled in tasks", labels=["export"]
        )
        clients = GaugeMetricFamily(
            "nbdserve_connected_clients", "Clients attached to the export", labels=["export"]
        )
        page_ins = CounterMetricFamily(
            "nbdserve_page_in_reads",
            "Reads that missed the page cache, by how they were answered: "
            "by the event loop once their pages came in, or by a thread after waiting",
            labels=["export", "answered_by"],
        )
        latency = HistogramMetricFamily(
            "nbdserve_request_latency_seconds",
            "Time from reading a request to sending its reply",
            labels=["export"],
        )
        layers = _LayerFamilies()
        for export in self.exports:
            name = export.name
            stats = export.stats
            for kind, n in stats.requests_by_name().items():
                requests.add_metric([name, kind], n)
            errors.add_metric([name], stats.errors)
            read.add_metric([name], stats.bytes_read)
            written.add_metric([name], stats.bytes_written)
            inflight.add_metric([name], stats.inflight)
            clients.add_metric([name], stats.clients)
            page_ins.add_metric([name, "loop"], stats.page_ins)
            page_ins.add_metric([name, "thread"], stats.page_ins_late)
            latency.add_metric([name], _buckets(stats.latency_buckets), stats.latency_sum)
            for depth, layer in enumerate(export.chain.layers):
                layers.add(name, f"{depth}:{layer.format_name}", layer.statistics())
        yield from (requests, errors, read, written, inflight, clients, page_ins, latency)
        yield from layers.families()


class _LayerFamilies:
    """The per-layer families: raw driver counters, cache hit ratios, prefetch."""

    def __init__(self) -> None:
        labels = ["export", "layer"]
        self.driver = GaugeMetricFamily(
            "nbdserve_driver_statistic",
            "Format driver counters (qcow2 cache hits and misses, FVD bitmap loads, ...)",
            labels=[*labels, "name"],
        )
        self.hit_ratio = GaugeMetricFamily(
            "nbdserve_cache_hit_ratio",
            "Lookups a metadata cache answered from memory: hits / (hits + misses)",
            labels=[*labels, "cache"],
        )
        # not "_bytes_total": that suffix promises a counter to Prometheus tools
        self.done = GaugeMetricFamily(
            "nbdserve_prefetch_done_bytes", "Bytes of the base already in the image", labels=labels
        )
        self.total = GaugeMetricFamily(
            "nbdserve_prefetch_size_bytes", "Bytes of the base to copy in all", labels=labels
        )
        self.rate = GaugeMetricFamily(
            "nbdserve_prefetch_throughput_bytes_per_second",
            f"Bytes prefetch stored per second over the last {RATE_WINDOW:g} s",
            labels=labels,
        )
        self.state = StateSetMetricFamily(
            "nbdserve_prefetch_state", "What the prefetcher is doing", labels=labels
        )

    def add(self, export: str, layer: str, stats: DriverStatistics) -> None:
        for key, value in stats.extra.items():
            self.driver.add_metric([export, layer, key], value)
        for cache, ratio in _hit_ratios(stats.extra).items():
            self.hit_ratio.add_metric([export, layer, cache], ratio)
        prefetch = stats.prefetch
        if prefetch is not None:
            self.done.add_metric([export, layer], prefetch.bytes_done)
            self.total.add_metric([export, layer], prefetch.bytes_total)
            self.rate.add_metric([export, layer], prefetch.copy_rate)
            states = {state.value: state.value == prefetch.state for state in PrefetchState}
            self.state.add_metric([export, layer], states)

    def families(self) -> Iterator[Metric]:
        yield from (self.driver, self.hit_ratio, self.done, self.total, self.rate, self.state)


def _hit_ratios(extra: dict[str, int]) -> dict[str, float]:
    """``NAME_hits`` and ``NAME_misses`` pairs (qcow2's l2 and refblock caches).

    A cache nobody has looked anything up in yet has no ratio, so no sample:
    0/0 shown as 0 or 1 would be a claim about a cache that was never used.
    """
    out: dict[str, float] = {}
    for key, hits in extra.items():
        if not key.endswith("_hits"):
            continue
        cache = key.removesuffix("_hits")
        misses = extra.get(f"{cache}_misses")
        if misses is not None and hits + misses:
            out[cache] = hits / (hits + misses)
    return out


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
        total += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
    return out


def make_registry(exports: ExportRegistry) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExportCollector(exports))
    return registry


def parse_address(text: str) -> tuple[str, int]:
    """``PORT``, ``:PORT`` or ``HOST:PORT`` (loopback unless a host is given)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    return (host.strip("[]") or "127.0.0.1"), int(port)


async def serve_metrics(
    exports: ExportRegistry,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer ``GET /metrics`` on host:port until cancelled."""
    registry = make_registry(exports)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[:2]
    LOGGER.info("event=metrics address=%s:%d", bound[0], bound[1])
    task_status.started((bound[0], bound[1]))

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(10):
                await _answer(stream, registry)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, listeners)


async def _answer(stream: trio.SocketStream, registry: CollectorRegistry) -> None:
    request = b""
    while b"\r\n\r\n" not in request and b"\n\n" not in request:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        request += chunk
        if len(request) > _MAX_REQUEST:
            await _respond(stream, 413, b"request too large\n")
            return
    method, _, rest = request.partition(b" ")
    path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        await _respond(stream, 405, b"only GET\n")
    elif path not in (b"/metrics", b"/"):
        await _respond(stream, 404, b"try /metrics\n")
    else:
        body = generate_latest(registry)
        await _respond(stream, 200, body if method == b"GET" else b"", CONTENT_TYPE)


async def _respond(
    stream: trio.SocketStream, status: int, body: bytes, ctype: str = "text/plain"
) -> None:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 413: "Too Large"}[status]
    head = (
        f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    await stream.send_all(head + body)
