"""FVD prefetch progress: on disk for ``img info`` while serving, and in the log."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import trio

from nbdserve.block.fvd import FvdDriver
from nbdserve.block.prefetch import PrefetchSettings
from tests.helpers.server import export, run, running_server

pytestmark = pytest.mark.interop

MIB = 1024 * 1024
BASE_SIZE = 16 * MIB
# 2 MiB/s over a 16 MiB base: about 8 s to copy, so several looks see it move
RATE_KIB_S = 2048


async def nbdserve(*args: str | Path) -> str:
    return await run(sys.executable, "-m", "nbdserve", *args)


async def make_image(tmp_path: Path, rate_kib_s: int = RATE_KIB_S) -> Path:
    (tmp_path / "base.raw").write_bytes(b"\x5a" * BASE_SIZE)
    image = tmp_path / "img.fvd"
    await nbdserve(
        "img", "create", "-q", "-f", "fvd", "-b", "base.raw", "-F", "raw",
        "-o", "block_size=64k,bytes_per_prefetch=256k,prefetch_start_delay=0",
        "-o", f"prefetch_max_read_throughput={rate_kib_s},prefetch_min_read_throughput=0",
        "-o", "prefetch_min_write_throughput=0",
        image,
    )  # fmt: skip
    return image


async def info_progress(image: Path) -> dict[str, object]:
    """The FVD part of ``nbdserve img info --output json`` (a separate process)."""
    doc = json.loads(await nbdserve("img", "info", "--output", "json", image))
    data = doc["format-specific"]["data"]
    assert isinstance(data, dict)
    return data


async def test_img_info_shows_growing_progress_while_served(tmp_path: Path) -> None:
    image = await make_image(tmp_path)
    seen: list[int] = []
    async with running_server(export(image, "img")) as srv:
        assert srv.registry is not None
        top = next(iter(srv.registry)).chain.top
        assert isinstance(top, FvdDriver)
        assert top.prefetcher is not None
        with trio.fail_after(30):
            while len(seen) < 2 or seen[-1] <= seen[0]:
                await trio.sleep(1.2)
                data = await info_progress(image)
                done = data["prefetch-bytes-copied"]
                assert isinstance(done, int)
                assert data["prefetch-bytes-total"] == BASE_SIZE
                assert data["prefetch-progress"] == f"{100.0 * done / BASE_SIZE:.1f}%"
                # the server is writing it: img info cannot see its live state
                assert data["prefetch-state"] == "in-use-elsewhere"
                if done:
                    # progress from the bounded interval, not from the end of the copy
                    assert done < BASE_SIZE
                    seen.append(done)
        assert top.prefetcher.state.value in ("running", "paused")
    data = await info_progress(image)
    assert data["prefetch-state"] == "stopped"


async def test_prefetch_progress_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = await make_image(tmp_path, rate_kib_s=8192)  # about 2 s
    wrapped = FvdDriver.prefetch_settings

    def often(self: FvdDriver) -> PrefetchSettings:
        # the header has no field for the report interval; 10 s is too slow here
        return dataclasses.replace(wrapped(self), report_interval=0.2)

    monkeypatch.setattr(FvdDriver, "prefetch_settings", often)
    caplog.set_level(logging.INFO, logger="nbdserve.block.prefetch")
    async with running_server(export(image, "img")) as srv:
        assert srv.registry is not None
        top = next(iter(srv.registry)).chain.top
        assert isinstance(top, FvdDriver)
        assert top.prefetcher is not None
        with trio.fail_after(40):
            await top.prefetcher.done.wait()
    events = [
        (m.group(1), int(m.group(2)))
        for r in caplog.records
        if (m := re.search(r"event=(prefetch-\w+) .* done=(\d+) total=", r.getMessage()))
    ]
    names = [name for name, _ in events]
    assert names[0] == "prefetch-start", names
    assert names[-1] == "prefetch-complete", names
    progress = [done for name, done in events if name == "prefetch-progress"]
    assert len(progress) >= 3, events
    assert progress == sorted(progress), progress
    assert progress[-1] > progress[0], progress
    assert events[-1][1] == BASE_SIZE
