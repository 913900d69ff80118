"""The Prometheus endpoint, scraped over HTTP while real clients do I/O.

Run with ``pytest -s`` to see a few lines of every family scraped.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path
from typing import NamedTuple

import trio
from prometheus_client.parser import text_string_to_metric_families

from nbdserve.protocol.constants import Cmd
from tests.conftest import require_tools
from tests.helpers.client import NbdClient
from tests.helpers.metrics import Labels, Samples
from tests.helpers.metrics import labels as _labels
from tests.helpers.metrics import parse as _parse
from tests.helpers.metrics import scrape as _scrape
from tests.helpers.metrics import scrape_async as _scrape_async
from tests.helpers.metrics import scrape_text as _scrape_text
from tests.helpers.server import export, run, running_server, uri

MiB = 1024 * 1024


def _show(title: str, text: str, per_family: int = 5) -> None:
    """A few samples of each family, for ``pytest -s`` (and the issue's closing note)."""
    print(f"\n--- metrics sample: {title}")
    for family in text_string_to_metric_families(text):
        print(f"# {family.name} ({family.type}): {family.documentation}")
        for sample in family.samples[:per_family]:
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            print(f"{sample.name}{{{labels}}} {sample.value:g}")


async def test_metrics_count_what_clients_did(tmp_path: Path) -> None:
    require_tools("qemu-io")
    img = tmp_path / "m.raw"
    img.write_bytes(bytes(4 * MiB))
    async with running_server(export(img, "m"), metrics="127.0.0.1:0") as srv:
        assert srv.metrics_address is not None
        before = await trio.to_thread.run_sync(_scrape, srv.metrics_address)
        await run(
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 7 0 1M",
            "-c",
            "read 0 64k",
            "-c",
            "flush",
            uri(srv, "m"),
        )
        after = await trio.to_thread.run_sync(_scrape, srv.metrics_address)
    label = (("export", "m"),)
    assert before[("nbdserve_written_bytes_total", label)] == 0
    assert after[("nbdserve_written_bytes_total", label)] == MiB
    assert after[("nbdserve_read_bytes_total", label)] >= 65536
    assert after[("nbdserve_requests_total", (("export", "m"), ("type", "flush")))] >= 1
    assert after[("nbdserve_requests_total", (("export", "m"), ("type", "write")))] >= 1
    assert after[("nbdserve_connected_clients", label)] == 0
    count = after[("nbdserve_request_latency_seconds_count", label)]
    assert count >= 3
    assert (
        after[("nbdserve_request_latency_seconds_bucket", (("export", "m"), ("le", "+Inf")))]
        == count
    )


async def test_metrics_endpoint_refuses_other_paths(tmp_path: Path) -> None:
    img = tmp_path / "m.raw"
    img.write_bytes(bytes(MiB))
    async with running_server(export(img, "m"), metrics="127.0.0.1:0") as srv:
        assert srv.metrics_address is not None
        host, port = srv.metrics_address

        def get(path: str) -> int:
            try:
                with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as r:
                    return int(r.status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)

        assert await trio.to_thread.run_sync(get, "/metrics") == 200
        assert await trio.to_thread.run_sync(get, "/secrets") == 404


async def test_metrics_errors_inflight_and_connected_clients(tmp_path: Path) -> None:
    img = tmp_path / "e.raw"
    img.write_bytes(bytes(MiB))
    label = _labels(export="e")
    async with (
        running_server(export(img, "e"), metrics="127.0.0.1:0") as srv,
        await NbdClient.connect_tcp("127.0.0.1", srv.port) as client,
    ):
        assert srv.metrics_address is not None
        await client.go("e")
        attached = await _scrape_async(srv.metrics_address)
        # a read past the end of the disk: refused, and counted as an error
        reply = await client.call(Cmd.READ, MiB, 4096)
        assert reply.error != 0
        assert await client.read(0, 4096) == bytes(4096)  # the connection still serves
        text = await trio.to_thread.run_sync(_scrape_text, srv.metrics_address)
        _show("raw export, one client attached, one refused read", text)
        after = _parse(text)
        await client.disconnect()
    assert attached[("nbdserve_connected_clients", label)] == 1
    assert attached[("nbdserve_errors_total", label)] == 0
    assert after[("nbdserve_errors_total", label)] == 1
    assert after[("nbdserve_connected_clients", label)] == 1
    assert after[("nbdserve_requests_total", _labels(export="e", type="read"))] == 2
    # between requests nothing is in flight; the gauge is there to say so
    assert after[("nbdserve_inflight_requests", label)] == 0


async def test_metrics_qcow2_l2_cache_hits_misses_and_ratio(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    img = tmp_path / "q.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", img, "64M")
    # at 64k clusters one L2 table maps 512 MiB: the first read loads it (a
    # miss), every later read finds it in the cache (a hit)
    await run("qemu-io", "-f", "qcow2", "-c", "write -P 5 0 2M", img)
    async with (
        running_server(export(img, "q", read_only=True), metrics="127.0.0.1:0") as srv,
        await NbdClient.connect_tcp("127.0.0.1", srv.port) as client,
    ):
        assert srv.metrics_address is not None
        await client.go("q")
        for _ in range(4):
            for offset in range(0, 2 * MiB, 256 * 1024):
                assert await client.read(offset, 4096) == b"\x05" * 4096
        text = await trio.to_thread.run_sync(_scrape_text, srv.metrics_address)
        await client.disconnect()
    _show("qcow2 after 32 reads of one L2 table's range", text)
    samples = _parse(text)

    def statistic(name: str) -> float:
        return samples[
            ("nbdserve_driver_statistic", _labels(export="q", layer="0:qcow2", name=name))
        ]

    hits, misses = statistic("l2_hits"), statistic("l2_misses")
    assert misses >= 1  # the table had to be read once
    assert hits >= 31  # and answered every later lookup
    ratio = samples[("nbdserve_cache_hit_ratio", _labels(export="q", layer="0:qcow2", cache="l2"))]
    assert ratio == hits / (hits + misses)
    assert ratio > 0.9


async def test_metrics_fvd_prefetch_progress_rate_and_state(tmp_path: Path) -> None:
    size = 8 * MiB
    (tmp_path / "base.raw").write_bytes(os.urandom(size))
    # capped at 4 MiB/s, the copy takes about two seconds: long enough to be
    # seen half done; no minimum speeds, so a busy machine causes no pauses
    await run(
        sys.executable, "-m", "nbdserve", "img", "create", "-q", "-f", "fvd",
        "-b", "base.raw", "-F", "raw",
        "-o", "block_size=64k,bytes_per_prefetch=256k,prefetch_start_delay=0",
        "-o", "prefetch_max_read_throughput=4096,prefetch_min_read_throughput=0",
        "-o", "prefetch_min_write_throughput=0",
        tmp_path / "top.fvd",
    )  # fmt: skip
    layer = _labels(export="f", layer="0:fvd")
    async with running_server(export(tmp_path / "top.fvd", "f"), metrics="127.0.0.1:0") as srv:
        assert srv.metrics_address is not None
        with trio.fail_after(60):
            seen = await _watch_prefetch(srv.metrics_address, layer, size)
    print(f"prefetch (done, total, bytes/s, state) over time: {seen}")
    done = [s.done for s in seen]
    assert all(s.total == size for s in seen)
    assert done == sorted(done), "bytes done went backwards"
    part_way = [s for s in seen if 0 < s.done < size]
    assert part_way, f"never seen part way: {done}"
    assert all(s.state in ("running", "paused") for s in part_way)
    assert any(s.rate > 0 for s in part_way)
    # bytes per second, not KiB: never far above the 4096 KiB/s cap
    assert all(s.rate <= 2 * 4096 * 1024 for s in seen), seen
    assert done[-1] == size
    assert seen[-1].state == "done"
    assert seen[-1].rate == 0  # nothing is being copied any more


class _Seen(NamedTuple):
    done: float
    total: float
    rate: float
    state: str


def _states(samples: Samples, layer: Labels) -> dict[str, float]:
    """The prefetch state set of one layer: state name -> 0 or 1."""
    out = {}
    for (name, labels), value in samples.items():
        rest = dict(labels)
        state = rest.pop("nbdserve_prefetch_state", None)
        if name == "nbdserve_prefetch_state" and state and tuple(sorted(rest.items())) == layer:
            out[state] = value
    return out


async def _watch_prefetch(address: tuple[str, int], layer: Labels, size: int) -> list[_Seen]:
    """Scrape every 0.1 s until the prefetch state is done."""
    seen: list[_Seen] = []
    shown = False
    while True:
        text = await trio.to_thread.run_sync(_scrape_text, address)
        samples = _parse(text)
        states = _states(samples, layer)
        assert sum(states.values()) == 1, states  # exactly one state at a time
        now = _Seen(
            samples[("nbdserve_prefetch_done_bytes", layer)],
            samples[("nbdserve_prefetch_size_bytes", layer)],
            samples[("nbdserve_prefetch_throughput_bytes_per_second", layer)],
            next(state for state, value in states.items() if value == 1),
        )
        seen.append(now)
        if not shown and 0 < now.done < size:
            _show("FVD overlay while prefetch runs", text)
            shown = True
        if now.state == "done":
            _show("FVD overlay once prefetch is done", text)
            return seen
        await trio.sleep(0.1)
