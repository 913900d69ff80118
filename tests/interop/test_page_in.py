"""Reads that miss the page cache wait in the loop for their pages (server/pagein.py).

The image is written, synced and dropped from the page cache; nbdsh then reads
scattered 4 KiB blocks of it at queue depth 16 and the bytes are compared with
the file.  Which way a read was answered is read from the export's counters:
``page_ins`` (by the loop, once its pages came in) and ``page_ins_late`` (by a
thread, after waiting).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from nbdserve.server import pagein
from nbdserve.server.stats import ExportStats
from tests.conftest import require_tools
from tests.helpers.metrics import labels, scrape_async
from tests.helpers.server import export, nbdsh_argv, run, running_server, uri

pytestmark = pytest.mark.interop

MiB = 1 << 20
BLOCK = 4096
SIZE = 64 * MiB


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _nowait_miss_reads_ahead(tmp_path: Path) -> bool:
    """Whether this kernel starts reading pages in when RWF_NOWAIT misses them
    (what waiting in the loop relies on), rather than only answering EAGAIN."""
    probe = tmp_path / "probe"
    probe.write_bytes(os.urandom(MiB))
    _evict(probe)
    fd = os.open(probe, os.O_RDONLY)
    try:
        buf = bytearray(BLOCK)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                os.preadv(fd, [buf], MiB // 2, os.RWF_NOWAIT)
                return True
            except BlockingIOError:
                time.sleep(0.001)
        return False
    finally:
        os.close(fd)


def _image(tmp_path: Path) -> tuple[Path, bytes]:
    img = tmp_path / "disk.raw"
    data = random.Random(7).randbytes(SIZE)
    img.write_bytes(data)
    _evict(img)
    return img, data


def _offsets(count: int) -> list[int]:
    """Blocks far apart and in no order, so that read-ahead for one does not
    bring in the next."""
    rng = random.Random(11)
    return [rng.randrange(0, SIZE // MiB) * MiB + rng.randrange(0, 4) * BLOCK for _ in range(count)]


def _reader_script(offsets: list[int], out: Path) -> str:
    return (
        "import nbd\n"
        f"bufs = []\n"
        f"for off in {offsets!r}:\n"
        f"    b = nbd.Buffer({BLOCK})\n"
        "    h.aio_pread(b, off)\n"
        "    bufs.append(b)\n"
        "    while h.aio_in_flight() >= 16:\n"
        "        h.poll(-1)\n"
        "while h.aio_in_flight() > 0:\n"
        "    h.poll(-1)\n"
        f"with open({str(out)!r}, 'wb') as f:\n"
        "    for b in bufs:\n"
        "        f.write(b.to_bytearray())\n"
    )


async def _read_evicted(tmp_path: Path, offsets: list[int]) -> tuple[ExportStats, bool]:
    """Read ``offsets`` of a freshly evicted image: the export's counters, and
    whether nbdsh got the file's bytes.  The counters' metrics must agree."""
    img, data = _image(tmp_path)
    out = tmp_path / "read.bin"
    async with running_server(export(img, "d", format="raw"), metrics="127.0.0.1:0") as srv:
        await run(
            *nbdsh_argv(), "-u", uri(srv, "d"), "-c", _reader_script(offsets, out), timeout=60
        )
        assert srv.registry is not None
        exp = srv.registry.lookup("d")
        assert exp is not None
        stats = exp.stats
        assert srv.metrics_address is not None
        metrics = await scrape_async(srv.metrics_address)
    for answered_by, count in (("loop", stats.page_ins), ("thread", stats.page_ins_late)):
        key = ("nbdserve_page_in_reads_total", labels(answered_by=answered_by, export="d"))
        assert metrics[key] == count, (answered_by, metrics[key], count)
    expected = b"".join(data[off : off + BLOCK] for off in offsets)
    return stats, out.read_bytes() == expected


async def test_reads_missing_the_page_cache_are_answered_by_the_loop(tmp_path: Path) -> None:
    require_tools("nbdsh")
    if not _nowait_miss_reads_ahead(tmp_path):
        pytest.skip("this kernel does not read ahead when RWF_NOWAIT misses")
    offsets = _offsets(256)
    stats, same = await _read_evicted(tmp_path, offsets)
    assert same, "nbdsh read other bytes than the file holds"
    # most reads waited in the loop (a few may have found their pages read ahead
    # already, or waited too long under load and gone to a thread)
    assert stats.page_ins >= len(offsets) // 2, (stats.page_ins, stats.page_ins_late)


async def test_reads_that_wait_too_long_are_answered_by_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_tools("nbdsh")
    monkeypatch.setattr(pagein, "PAGE_IN_SPIN", 0.0)  # every read is late at its first poll
    monkeypatch.setattr(pagein, "PAGE_IN_TRIPS", 10**9)  # and waiting never pauses
    offsets = _offsets(128)
    stats, same = await _read_evicted(tmp_path, offsets)
    assert same, "nbdsh read other bytes than the file holds"
    assert stats.page_ins == 0
    # every read that missed the page cache; some find theirs read ahead already
    assert stats.page_ins_late >= len(offsets) // 2, stats.page_ins_late
