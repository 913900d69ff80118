"""Scraping the Prometheus endpoint in tests: samples keyed by (name, sorted labels)."""

from __future__ import annotations

import urllib.request

import trio
from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


def scrape_text(address: tuple[str, int]) -> str:
    url = f"http://{address[0]}:{address[1]}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode())


def parse(text: str) -> Samples:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape(address: tuple[str, int]) -> Samples:
    return parse(scrape_text(address))


async def scrape_async(address: tuple[str, int]) -> Samples:
    return await trio.to_thread.run_sync(scrape, address)


def labels(**kwargs: str) -> Labels:
    return tuple(sorted(kwargs.items()))
