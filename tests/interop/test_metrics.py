"""The Prometheus endpoint, scraped over HTTP while real clients do I/O."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_tools
from tests.helpers.server import export, run, running_server, uri

MiB = 1024 * 1024


def _scrape(address: tuple[str, int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://{address[0]}:{address[1]}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


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
