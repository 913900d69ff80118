"""Per-export counters, kept as plain ints on the request path.

The hot path only adds to integers; turning them into Prometheus metrics
happens on scrape (``metrics.py``), so metrics cost nothing per request.
Latency is observed once per batch of inline replies (every request of the
batch waited the same time) and once per request handled in a task.
"""

from __future__ import annotations

import bisect

from nbdserve.protocol.constants import Cmd

# seconds; the last bucket is +Inf
LATENCY_BUCKETS: tuple[float, ...] = (
    25e-6,
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    500e-3,
    1.0,
    2.5,
    5.0,
    10.0,
)
COMMAND_NAMES: dict[int, str] = {int(c): c.name.lower() for c in Cmd}


class ExportStats:
    """Counters of one export; mutated by sessions, read by the metrics collector."""

    __slots__ = (
        "bytes_read",
        "bytes_written",
        "clients",
        "errors",
        "inflight",
        "latency_buckets",
        "latency_count",
        "latency_sum",
        "page_ins",
        "page_ins_late",
        "requests",
    )

    def __init__(self) -> None:
        self.requests = [0] * (max(COMMAND_NAMES) + 2)  # last slot: unknown commands
        self.errors = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.inflight = 0
        self.clients = 0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0
        # reads that missed the page cache and were answered by the loop once their
        # pages came in, and those handed to a thread after waiting (server/pagein.py)
        self.page_ins = 0
        self.page_ins_late = 0

    def count(self, cmd: int, length: int = 0) -> None:
        """One request of ``cmd`` (bytes of READ and WRITE payloads counted too)."""
        slot = cmd if 0 <= cmd < len(self.requests) - 1 else len(self.requests) - 1
        self.requests[slot] += 1
        if cmd == _READ:
            self.bytes_read += length
        elif cmd == _WRITE:
            self.bytes_written += length

    def observe(self, seconds: float, n: int = 1) -> None:
        """``n`` requests completed after ``seconds``."""
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += n
        self.latency_sum += seconds * n
        self.latency_count += n

    def requests_by_name(self) -> dict[str, int]:
        out = {name: self.requests[cmd] for cmd, name in COMMAND_NAMES.items()}
        out["unknown"] = self.requests[-1]
        return out


_READ = int(Cmd.READ)
_WRITE = int(Cmd.WRITE)
