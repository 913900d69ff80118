"""Huge sparse exports through real clients: zeroing, copying, many exports.

Costs are counted in the server process (bytes written or read through
FileBackend, bytes the clients asked to read, traced memory), not timed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nbdserve.block.file import FileBackend
from tests.conftest import require_tools
from tests.helpers.server import export, nbdsh_argv, run, running_server, unix_uri, uri
from tests.scale.costs import (
    GiB,
    KiB,
    MiB,
    TiB,
    make_fvd,
    make_qcow2,
    run_tool,
    spread,
    traced_now,
    tracing,
)

pytestmark = pytest.mark.interop

HUGE = 16 * TiB


@dataclass
class WriteCounter:
    bytes: int = 0


@contextlib.contextmanager
def counting_writes() -> Iterator[WriteCounter]:
    counter = WriteCounter()
    original = FileBackend.pwrite

    async def pwrite(self: FileBackend, offset: int, data: object) -> None:
        counter.bytes += memoryview(data).nbytes  # type: ignore[arg-type]
        await original(self, offset, data)  # type: ignore[arg-type]

    FileBackend.pwrite = pwrite  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        FileBackend.pwrite = original  # type: ignore[method-assign]


async def fresh_image(kind: str, tmp_path: Path) -> Path:
    if kind == "qcow2":
        return await make_qcow2(tmp_path / "z.qcow2", HUGE, [])
    if kind == "qcow2-backed":
        base = await make_qcow2(tmp_path / "base.qcow2", HUGE, [(0, MiB)])
        return await make_qcow2(tmp_path / "z.qcow2", HUGE, [], backing=base)
    if kind == "fvd":
        path = tmp_path / "z.fvd"
        await run_tool(
            sys.executable, "-m", "nbdserve", "img", "create", "-q", "-f", "fvd",
            "-o", "compact=on", path, str(HUGE),
        )  # fmt: skip
        return path
    return await make_fvd(tmp_path / "z.fvd", HUGE, [(0, MiB)], [])


@pytest.mark.parametrize("kind", ["qcow2", "qcow2-backed", "fvd", "fvd-backed"])
async def test_fast_zero_over_huge_ranges_writes_metadata_only(tmp_path: Path, kind: str) -> None:
    """WRITE_ZEROES with FAST_ZERO and NO_HOLE unset over 3 x ~4 GiB of a fresh
    16 TiB image: accepted (no ENOTSUP), reads back as zeros, and what reaches
    the image file is metadata (L2 tables / bitmap pages), never zero data."""
    require_tools("qemu-img", "qemu-io", "nbdsh")
    path = await fresh_image(kind, tmp_path)
    span = 4 * GiB - 1 * MiB  # what one NBD request can carry
    starts = [0, HUGE // 2, HUGE - span]
    script = "".join(f"h.zero({span}, {s}, nbd.CMD_FLAG_FAST_ZERO); " for s in starts)
    script += "".join(f"assert h.pread(4096, {s + span // 2}) == bytes(4096); " for s in starts)
    script += "h.flush()"
    with counting_writes() as written:
        async with running_server(export(path, "z"), tcp=False, socket_path=tmp_path / "s"):
            await run(*nbdsh_argv(), "-u", unix_uri(tmp_path / "s", "z"), "-c", script)
    zeroed = len(starts) * span
    if kind == "qcow2-backed":
        # the backing file must not show through: zero-flagged L2 entries, one 64 KiB
        # table per 512 MiB; each allocation writes the new table, the refcount
        # block ahead of the L1 entry, and the table again when flushed
        tables = sum(((s + span - 1) >> 29) - (s >> 29) + 1 for s in starts)
        assert written.bytes <= tables * 3 * 64 * KiB + 1 * MiB, written.bytes
    else:
        # nothing to allocate: headers, bitmap pages and journal sectors at most
        assert written.bytes <= 1 * MiB, written.bytes
    assert written.bytes * 1000 < zeroed


async def test_copy_of_a_sparse_export_reads_only_the_data(tmp_path: Path) -> None:
    """nbdcopy and qemu-img convert of a 1 TiB export holding 8 MiB: the clients
    find the holes by block status and read only the data."""
    require_tools("qemu-img", "qemu-io", "nbdcopy")
    pieces = spread(1 * TiB, 8, 1 * MiB)
    image = await make_qcow2(tmp_path / "big.qcow2", 1 * TiB, pieces)
    data_bytes = sum(n for _, n in pieces)
    async with running_server(export(image, "big", read_only=True)) as srv:
        assert srv.registry is not None
        stats = next(iter(srv.registry)).stats
        out = tmp_path / "copy.raw"
        await run("nbdcopy", uri(srv, "big"), out)
        copied = stats.bytes_read
        assert data_bytes <= copied <= data_bytes + 16 * MiB, copied
        await run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", out, image)
        assert os.stat(out).st_blocks * 512 <= data_bytes + 16 * MiB  # still sparse
        out.unlink()
        await run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(srv, "big"), out)
        assert stats.bytes_read - copied <= data_bytes + 16 * MiB
        await run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", out, image)


async def test_200_exports_are_cheap_when_idle(tmp_path: Path) -> None:
    """One server, 200 exports of 16 TiB images: the memory an idle export holds is
    its metadata directory (qcow2's L1 table: 256 KiB at 16 TiB), and listing
    the exports answers for all of them."""
    require_tools("qemu-img", "nbdinfo")
    count = 200
    first = await make_qcow2(tmp_path / "e0.qcow2", HUGE, [(0, MiB)])
    raw = first.read_bytes()
    paths = [first]
    for i in range(1, count):
        path = tmp_path / f"e{i}.qcow2"
        path.write_bytes(raw)
        paths.append(path)
    exports = [export(p, f"e{i}", read_only=True) for i, p in enumerate(paths)]
    with tracing():
        before = traced_now()
        async with running_server(*exports, tcp=False, socket_path=tmp_path / "s"):
            per_export = (traced_now() - before) / count
            listing = await run("nbdinfo", "--list", "--json", unix_uri(tmp_path / "s"))
            names = {e["export-name"] for e in json.loads(listing)["exports"]}
            assert names == {f"e{i}" for i in range(count)}
            got = await run(*nbdsh_argv(), "-u", unix_uri(tmp_path / "s", "e123"), "-c",
                            "print(h.pread(4, 0).hex())")  # fmt: skip
            assert got.strip() == "01010101"
    assert per_export <= 256 * KiB + 128 * KiB, per_export
