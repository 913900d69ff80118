"""Prometheus metrics: a collector over the export counters and a tiny HTTP endpoint.

The collector reads ``ExportStats`` and each driver's ``statistics()`` on
scrape, so serving requests never touches prometheus objects.  The endpoint
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
)
from prometheus_client.registry import Collector

from nbdserve.server.stats import LATENCY_BUCKETS

if TYPE_CHECKING:
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
        latency = HistogramMetricFamily(
            "nbdserve_request_latency_seconds",
            "Time from reading a request to sending its reply",
            labels=["export"],
        )
        driver = GaugeMetricFamily(
            "nbdserve_driver_statistic",
            "Format driver statistics (qcow2 cache hits, FVD prefetch progress, ...)",
            labels=["export", "layer", "name"],
        )
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
            latency.add_metric([name], _buckets(stats.latency_buckets), stats.latency_sum)
            for depth, layer in enumerate(export.chain.layers):
                for key, value in layer.statistics().extra.items():
                    driver.add_metric([name, f"{depth}:{layer.format_name}", key], value)
        yield from (requests, errors, read, written, inflight, clients, latency, driver)


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
