"""qcow2 read path, block status and info against QEMU on a matrix of qemu-made images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from nbdserve.block.chain import ChainOptions, open_chain
from nbdserve.block.file import FileBackend
from nbdserve.block.qcow2 import Qcow2Driver
from nbdserve.img import image_info, image_map
from tests.conftest import require_tools
from tests.helpers.images import (
    chain_map_from_nbdinfo,
    expected_nbd_maps,
    normalize_map,
    qemu_img,
    qemu_img_map,
    qemu_io,
    read_driver,
    to_raw,
)
from tests.helpers.qcow2_matrix import MATRIX, build_all
from tests.helpers.server import export, run, running_server, uri

pytestmark = pytest.mark.interop

NAMES = sorted(MATRIX)
MiB = 1 << 20


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_tools("qemu-img", "qemu-io")
    return build_all(tmp_path_factory.mktemp("qcow2-matrix"))


@pytest.fixture(scope="module")
def raws(matrix: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("qcow2-raw")
    out = {}
    for name, path in matrix.items():
        out[name] = d / f"{name}.raw"
        to_raw(path, out[name])
    return out


@pytest.mark.parametrize("name", NAMES)
async def test_content_matches_qemu(
    matrix: dict[str, Path], raws: dict[str, Path], name: str
) -> None:
    ours = await read_driver(matrix[name])
    theirs = raws[name].read_bytes()
    assert len(ours) == len(theirs)
    if ours != theirs:
        first = next(i for i in range(len(ours)) if ours[i] != theirs[i])
        pytest.fail(f"{name}: first difference at byte {first}")


@pytest.mark.parametrize("name", NAMES)
async def test_map_matches_qemu_img_map(matrix: dict[str, Path], name: str) -> None:
    ours = normalize_map(await image_map(str(matrix[name])))
    assert ours == qemu_img_map(matrix[name])


@pytest.mark.parametrize("name", NAMES)
async def test_info_matches_qemu_img_info(matrix: dict[str, Path], name: str) -> None:
    theirs = json.loads(qemu_img("info", "--output=json", matrix[name]))
    ours = (await image_info(str(matrix[name])))[0]
    assert ours["cluster-size"] == theirs["cluster-size"]
    assert ours["virtual-size"] == theirs["virtual-size"]
    assert ours["format-specific"] == theirs["format-specific"]
    assert ours.get("backing-filename") == theirs.get("backing-filename")


def test_img_map_cli_matches_qemu(matrix: dict[str, Path]) -> None:
    for name in ("extl2", "chain3", "zero_alloc"):
        out = subprocess.run(
            [sys.executable, "-m", "nbdserve", "img", "map", "--output", "json", str(matrix[name])],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert normalize_map(json.loads(out)) == qemu_img_map(matrix[name]), name


async def test_nbd_clients_see_what_qemu_sees(
    matrix: dict[str, Path], raws: dict[str, Path]
) -> None:
    """nbdinfo maps (both contexts) and qemu-img compare through the real server."""
    require_tools("nbdinfo", "qemu-img")
    exports = [export(path, name, format="qcow2", read_only=True) for name, path in matrix.items()]
    failures = []
    async with running_server(*exports) as handle:
        for name in NAMES:
            u = uri(handle, name)
            alloc, depth = expected_nbd_maps(qemu_img_map(matrix[name]))
            got_alloc = chain_map_from_nbdinfo(await run("nbdinfo", "--map", "--json", u))
            got_depth = chain_map_from_nbdinfo(
                await run("nbdinfo", "--map=qemu:allocation-depth", "--json", u)
            )
            if got_alloc != alloc:
                failures.append(f"{name} base:allocation {got_alloc} != {alloc}")
            if got_depth != depth:
                failures.append(f"{name} allocation-depth {got_depth} != {depth}")
            await run("qemu-img", "compare", "-f", "raw", "-F", "raw", raws[name], u)
    assert not failures, "\n".join(failures)


async def test_try_readinto_serves_cached_allocated_clusters(matrix: dict[str, Path]) -> None:
    chain = await open_chain(str(matrix["c64k"]), ChainOptions(read_only=True))
    try:
        top = chain.top
        buf = bytearray(4096)
        # first access loads the L2 table through the slow path
        await top.readinto(0, memoryview(buf))
        buf2 = bytearray(4096)
        assert top.try_readinto(0, memoryview(buf2))
        assert buf2 == buf == b"\x11" * 4096
        # a zero cluster is answered inline too
        zeros = bytearray(b"\xff" * 4096)
        assert top.try_readinto(128 * 1024, memoryview(zeros))
        assert zeros == bytes(4096)
    finally:
        await chain.aclose()


async def test_huge_sparse_image_maps_fast(tmp_path: Path) -> None:
    path = tmp_path / "huge.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "16T")
    qemu_io(
        path, "write -P 1 0 64k", "write -P 2 8t 64k", "write -z 12t 1m", "write -P 3 16383g 4k"
    )
    start = time.monotonic()
    ours = normalize_map(await image_map(str(path)))
    elapsed = time.monotonic() - start
    assert ours == qemu_img_map(path)
    assert elapsed < 2.0, f"mapping a sparse 16 TiB image took {elapsed:.2f}s"


async def test_fast_path_spans_contiguous_clusters_and_zero_copy(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    path = tmp_path / "contig.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io(path, "write -P 7 0 1m", "write -P 8 2m 64k", "write -P 9 1m 64k", "write -z 3m 64k")
    want = b"\x07" * (64 * 1024) + b"\x09" * (64 * 1024)
    chain = await open_chain(str(path), ChainOptions(read_only=True))
    try:
        top = chain.top
        await top.readinto(0, memoryview(bytearray(4096)))  # load the L2 table
        buf = bytearray(1 << 20)
        assert top.try_readinto(0, memoryview(buf))
        assert buf == b"\x07" * (1 << 20)
        # 1m..1m+64k was allocated after 2m: two pieces of the file, read one by one
        scattered = bytearray(128 * 1024)
        assert top.try_readinto(960 * 1024, memoryview(scattered))
        assert scattered == want
        slow = bytearray(128 * 1024)
        await top.readinto(960 * 1024, memoryview(slow))
        assert slow == want
        # a zero cluster (3m) or an unallocated one (2m+64k) is not file data
        assert top.zero_copy_region(3 * MiB - 64 * 1024, 128 * 1024) is None
        assert top.zero_copy_region(2 * MiB, 128 * 1024) is None
        assert not top.try_readinto(2 * MiB, memoryview(bytearray(128 * 1024)))
        # zero-copy regions exist only when the pages are resident (cachestat)
        region = top.zero_copy_region(64 * 1024, 512 * 1024)
        if region is not None:
            fd, pieces = region
            assert list(pieces) == [(pieces[0][0], 512 * 1024)], pieces
            assert os.pread(fd, 16, pieces[0][0]) == b"\x07" * 16
        region = top.zero_copy_region(960 * 1024, 128 * 1024)
        if region is not None:
            fd, pieces = region
            assert [n for _, n in pieces] == [64 * 1024, 64 * 1024], pieces
            assert b"".join(os.pread(fd, n, host) for host, n in pieces) == want
    finally:
        await chain.aclose()


async def test_a_scattered_read_from_the_disk_takes_one_thread_hand_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the page cache cannot serve a read of scattered clusters, all of its
    pieces are read in one worker thread, not one hand-off per cluster."""
    require_tools("qemu-img", "qemu-io")
    path = tmp_path / "scattered.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io(path, *[f"write -P {k + 1} {k * 64}k 64k" for k in reversed(range(16))])
    chain = await open_chain(str(path), ChainOptions(read_only=True))
    hand_offs = []
    original = trio.to_thread.run_sync

    async def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        hand_offs.append(fn)
        return await original(fn, *args, **kwargs)

    try:
        top = chain.top
        assert isinstance(top, Qcow2Driver)
        await top.readinto(0, memoryview(bytearray(4096)))  # load the L2 table
        top.data_file._nowait = False  # as if nothing were in the page cache
        monkeypatch.setattr(trio.to_thread, "run_sync", counting)
        buf = bytearray(MiB)
        await top.readinto(0, memoryview(buf))
        assert buf == b"".join(bytes([k + 1]) * 65536 for k in range(16))
        assert len(hand_offs) == 1, hand_offs
    finally:
        await chain.aclose()


async def test_reads_an_overlay_leaves_to_its_base_go_out_from_the_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overlay over a template: large reads of ranges the overlay never wrote are
    sent straight from the base file; ranges it wrote, and the part of the disk
    beyond a shorter base (zeros), are not."""
    require_tools("qemu-img", "qemu-io", "nbdcopy")
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * (6 * MiB // 256))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top, "8M")
    qemu_io(top, "write -P 3 1m 64k", "write -z 4m 64k")
    chain = await open_chain(str(top), ChainOptions(read_only=True))
    try:
        drv = chain.top
        await drv.readinto(0, memoryview(bytearray(4096)))  # load the L2 table
        region = drv.zero_copy_region(2 * MiB, MiB)
        if region is not None:  # only when the base's pages are resident (cachestat)
            fd, pieces = region
            assert os.path.samefile(f"/proc/self/fd/{fd}", base)
            want = base.read_bytes()[2 * MiB : 3 * MiB]
            assert b"".join(os.pread(fd, n, host) for host, n in pieces) == want
        assert drv.zero_copy_region(MiB - 64 * 1024, 128 * 1024) is None, "overlay data"
        assert drv.zero_copy_region(4 * MiB, 128 * 1024) is None, "a zero cluster"
        assert drv.zero_copy_region(6 * MiB - 64 * 1024, 128 * 1024) is None, "past the base"
    finally:
        await chain.aclose()
    from_base: list[str] = []
    original = FileBackend.sendfile_pieces

    def noting(file: FileBackend, pieces: Sequence[tuple[int, int]]) -> object:
        region = original(file, pieces)
        if region is not None:
            from_base.append(file.path)
        return region

    monkeypatch.setattr(FileBackend, "sendfile_pieces", noting)
    exp = export(top, "o", format="qcow2", read_only=True, backing_dirs=[str(tmp_path)])
    async with running_server(exp) as handle:
        out = tmp_path / "copy.raw"
        await run("nbdcopy", f"--request-size={MiB}", uri(handle, "o"), out)
        await run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", out, top)
    assert str(base) in from_base, from_base


async def test_scattered_clusters_reach_clients_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest that wrote its disk back to front leaves no cluster next to its
    neighbour in the file.  Large reads then go out a stretch at a time (sendfile
    or a read per stretch), and clients must still get the guest's bytes in order."""
    require_tools("qemu-img", "qemu-io", "nbdcopy")
    path = tmp_path / "scattered.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    # 128 KiB stretches (two clusters each) in reverse order, a zero cluster, a hole
    writes = [f"write -P {k + 1} {k * 128 * 1024} 128k" for k in reversed(range(64))]
    qemu_io(path, *writes, "write -z 3m 64k", "discard 5m 64k")
    asked: list[int] = []
    original = FileBackend.sendfile_pieces

    def noting(file: FileBackend, pieces: Sequence[tuple[int, int]]) -> object:
        asked.append(len(pieces))
        return original(file, pieces)

    monkeypatch.setattr(FileBackend, "sendfile_pieces", noting)
    async with running_server(export(path, "s", format="qcow2", read_only=True)) as handle:
        u = uri(handle, "s")
        for request_size in (256 * 1024, MiB):
            out = tmp_path / f"copy-{request_size}.raw"
            await run("nbdcopy", f"--request-size={request_size}", u, out)
            await run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", out, path)
        await run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", u, path)
    assert max(asked, default=0) >= 2, f"no read spanned two stretches: {asked}"


@pytest.mark.parametrize("opts", ["cluster_size=64k", "extended_l2=on"])
async def test_fast_path_answers_zero_clusters_without_backing(tmp_path: Path, opts: str) -> None:
    require_tools("qemu-img", "qemu-io")
    path = tmp_path / "z.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, path, "4M")
    qemu_io(path, "write -P 7 0 8k", "write -z 64k 64k")
    chain = await open_chain(str(path), ChainOptions(read_only=True))
    try:
        top = chain.top
        await top.readinto(0, memoryview(bytearray(512)))  # load the L2 table
        for off, want in ((70 * 1024, True), (200 * 1024, True), (3 << 20, True), (4096, True)):
            buf = bytearray(b"\xff" * 4096)
            assert top.try_readinto(off, memoryview(buf)) is want
            expected = b"\x07" * 4096 if off == 4096 else bytes(4096)
            assert buf == expected, off
        if "extended" in opts:  # allocated and unallocated subclusters mixed: declined
            assert not top.try_readinto(6 * 1024, memoryview(bytearray(4096)))
    finally:
        await chain.aclose()


async def test_a_host_hole_or_two_does_not_make_an_image_preallocated(tmp_path: Path) -> None:
    """QEMU calls an image metadata-preallocated (and then reports host holes under
    data clusters as zeros) only when clearly more clusters are in use than the file
    holds: a tenth more and at least two.  One hole must leave the map as QEMU has it."""
    require_tools("qemu-img", "qemu-io")
    path = tmp_path / "holed.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", path, "8M")
    qemu_io(path, "write -P 0x5a 0 4M")
    map_before = qemu_img_map(path)
    # give one data cluster back to the host file system: qemu still calls it data
    host = next(e["offset"] for e in json.loads(qemu_img("map", "--output=json", path)))
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    blocks = os.stat(path).st_blocks
    await run(
        "fallocate", "--punch-hole", "--offset", str(host + 65536), "--length", "65536", path,
        check=False,
    )  # fmt: skip
    if os.stat(path).st_blocks >= blocks:
        pytest.skip("the file system cannot punch holes")
    theirs = qemu_img_map(path)
    assert theirs == map_before, "qemu-img: one hole is not preallocation"
    assert normalize_map(await image_map(str(path))) == theirs
