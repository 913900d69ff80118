"""qcow2 check/repair against qemu-img check, and corrupt images served safely."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from nbdserve.block.chain import ChainOptions, open_chain
from nbdserve.block.device import BlockDevice
from nbdserve.block.qcow2 import check_image
from nbdserve.errors import BackingChainError, CorruptImageError, InvalidImageError
from tests.conftest import require_tools
from tests.helpers import qcow2_patch as P
from tests.helpers.images import assert_clean, qemu_img, qemu_img_check, qemu_io, to_raw
from tests.helpers.qcow2_matrix import MATRIX
from tests.helpers.server import export, nbdsh_argv, run, running_server, uri

pytestmark = pytest.mark.interop

MiB = 1024 * 1024


def _base(d: Path, name: str = "img.qcow2") -> Path:
    path = d / name
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    qemu_io(path, "write -P 1 0 1m", "write -P 2 4m 192k")
    return path


def _leak(p: Path) -> None:
    P.put_u64(p, P.l2_entry_at(p, 4 * MiB), 0)  # the cluster stays counted


def _refcount_too_low(p: Path) -> None:
    host = P.u64(p, P.l2_entry_at(p, 0)) & 0x00FFFFFFFFFFFE00
    P.put_u16(p, P.refcount_entry_at(p, host // P.cluster_size(p)), 0)


def _copied_cleared(p: Path) -> None:
    at = P.l2_entry_at(p, 64 * 1024)
    P.put_u64(p, at, P.u64(p, at) & ~(1 << 63))


def _misaligned(p: Path) -> None:
    at = P.l2_entry_at(p, 128 * 1024)
    P.put_u64(p, at, P.u64(p, at) + 512)


def _past_end(p: Path) -> None:
    P.put_u64(p, P.l2_entry_at(p, 192 * 1024), (1 << 40) | (1 << 63))


def _overlap(p: Path) -> None:
    # the second data cluster now points at the first one's host cluster
    first = P.u64(p, P.l2_entry_at(p, 0))
    P.put_u64(p, P.l2_entry_at(p, 64 * 1024), first)


CASES: dict[str, Callable[[Path], None]] = {
    "leak": _leak,
    "refcount_too_low": _refcount_too_low,
    "copied_cleared": _copied_cleared,
    "misaligned": _misaligned,
    "past_end": _past_end,
    "overlap": _overlap,
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_check_agrees_with_qemu_img(tmp_path: Path, case: str) -> None:
    require_tools("qemu-img", "qemu-io")
    path = _base(tmp_path)
    CASES[case](path)
    theirs = qemu_img_check(path)
    ours = await check_image(str(path), None)
    assert ours.exit_status() == theirs["exit"], (ours.messages, theirs)
    assert ours.leaks == theirs.get("leaks", 0)
    assert bool(ours.corruptions) == bool(theirs.get("corruptions", 0)), (ours.messages, theirs)
    assert ours.image_end_offset == theirs.get("image-end-offset")


@pytest.mark.parametrize("case", sorted(CASES))
async def test_repair_all_leaves_qemu_happy(tmp_path: Path, case: str) -> None:
    require_tools("qemu-img", "qemu-io")
    path = _base(tmp_path)
    before = to_raw(path, tmp_path / "before.raw")
    CASES[case](path)
    report = await check_image(str(path), "all")
    assert report.exit_status() == 0, report.messages
    assert report.leaks_fixed + report.corruptions_fixed > 0
    assert_clean(path)
    after = to_raw(path, tmp_path / "after.raw")
    if case in ("leak", "refcount_too_low", "copied_cleared"):
        if case == "leak":
            before = before[: 4 * MiB] + bytes(64 * 1024) + before[4 * MiB + 64 * 1024 :]
        assert after == before


async def test_repair_leaks_only_leaves_corruptions(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    path = _base(tmp_path)
    _leak(path)
    _refcount_too_low(path)
    report = await check_image(str(path), "leaks")
    assert report.leaks == 0
    assert report.leaks_fixed == 1
    assert report.corruptions > 0
    assert report.exit_status() == 2
    assert qemu_img_check(path).get("leaks", 0) == 0


async def test_check_of_our_own_writes_and_snapshots(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    path = _base(tmp_path)
    qemu_img("snapshot", "-c", "s", path)
    qemu_io(path, "write -P 3 32k 64k")
    ours = await check_image(str(path), None)
    theirs = qemu_img_check(path)
    assert ours.exit_status() == theirs["exit"] == 0
    assert ours.allocated_clusters == theirs.get("allocated-clusters", 0)
    assert ours.fragmented_clusters == theirs.get("fragmented-clusters", 0)
    assert ours.image_end_offset == theirs["image-end-offset"]


async def test_dirty_image_is_repaired_when_opened_read_write(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    path = tmp_path / "lazy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "8M")
    qemu_io(path, "write -P 1 0 1m", "write -P 2 4m 192k")
    _leak(path)
    P.set_incompatible(path, 1)  # dirty: as if the writer died with lazy refcounts
    chain = await open_chain(str(path), ChainOptions(read_only=True))
    await chain.aclose()
    assert P.u64(path, 72) & 1, "a read-only open must not touch the image"
    chain = await open_chain(str(path), ChainOptions(read_only=False))
    try:
        await BlockDevice(chain.top).write(0, b"after repair")
    finally:
        await chain.aclose()
    assert not P.u64(path, 72) & 1
    assert_clean(path)


# ---- corrupt images at open and during I/O ------------------------------------------------


def _huge_l1(p: Path) -> None:
    P.put_u32(p, 36, 0x7FFFFFFF)


def _reftable_on_header(p: Path) -> None:
    P.put_u64(p, 48, 0)


def _truncated(p: Path) -> None:
    with open(p, "r+b") as f:
        f.truncate(1000)


def _l1_table_past_end(p: Path) -> None:
    P.put_u64(p, 40, 1 << 45)


def _l1_on_reftable(p: Path) -> None:
    P.put_u64(p, 40, P.u64(p, 48))


OPEN_FAILURES: dict[str, Callable[[Path], None]] = {
    "l1_on_reftable": _l1_on_reftable,
    "huge_l1_size": _huge_l1,
    "reftable_on_header": _reftable_on_header,
    "truncated": _truncated,
    "l1_table_past_end": _l1_table_past_end,
}


@pytest.mark.parametrize("case", sorted(OPEN_FAILURES))
async def test_bad_headers_fail_at_open(tmp_path: Path, case: str) -> None:
    require_tools("qemu-img", "qemu-io")
    path = _base(tmp_path)
    OPEN_FAILURES[case](path)
    with trio.fail_after(5), pytest.raises(InvalidImageError):
        await open_chain(str(path), ChainOptions(read_only=True))
    report = await check_image(str(path), None)
    assert report.exit_status() == 1


async def test_backing_loop_is_refused(tmp_path: Path) -> None:
    require_tools("qemu-img")
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", a, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a)
    with trio.fail_after(5), pytest.raises(BackingChainError):
        await open_chain(str(b), ChainOptions(read_only=True))


def _l1_entry_past_end(p: Path) -> None:
    # the L2 table for the second 512 MiB does not exist; point L1[0] past the end
    P.put_u64(p, P.l1_entry_at(p, 0), (1 << 40) | (1 << 63))


IO_FAILURES: dict[str, tuple[Callable[[Path], None], int, int]] = {
    # case: (patch, bad guest offset, good guest offset or -1)
    "l1_entry_past_end": (_l1_entry_past_end, 0, -1),
    "misaligned_l2_entry": (_misaligned, 128 * 1024, 0),
    "past_end_l2_entry": (_past_end, 192 * 1024, 0),
}


@pytest.mark.parametrize("case", sorted(IO_FAILURES))
async def test_corrupt_tables_fail_only_the_affected_request(tmp_path: Path, case: str) -> None:
    require_tools("qemu-img", "qemu-io")
    path = _base(tmp_path)
    patch, bad, good = IO_FAILURES[case]
    patch(path)
    chain = await open_chain(str(path), ChainOptions(read_only=False))
    try:
        dev = BlockDevice(chain.top)
        with pytest.raises(CorruptImageError):
            await dev.read(bad, 4096)
        if good >= 0:
            assert await dev.read(good, 4096) == b"\x01" * 4096
        with pytest.raises(CorruptImageError):  # the driver is now failed for writes
            await dev.write(6 * MiB, b"x")
    finally:
        await chain.aclose()


async def test_server_keeps_serving_next_to_a_corrupt_image(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io", "nbdsh")
    bad_dir, good_dir = tmp_path / "bad", tmp_path / "good"
    bad_dir.mkdir()
    good_dir.mkdir()
    bad = _base(bad_dir)
    _misaligned(bad)
    good = _base(good_dir)
    script = (
        "import nbd\n"
        "try:\n"
        "    h.pread(4096, 128 * 1024)\n"
        "    raise SystemExit('read of a corrupt cluster succeeded')\n"
        "except nbd.Error as e:\n"
        "    assert 'EIO' in str(e), e\n"
        "assert h.pread(4096, 0) == b'\\x01' * 4096\n"
    )
    async with running_server(
        export(bad, "bad", format="qcow2"), export(good, "good", format="qcow2"), strict=False
    ) as srv:
        await run(*nbdsh_argv(), "-u", uri(srv, "bad"), "-c", script)
        await run(
            *nbdsh_argv(), "-u", uri(srv, "bad"), "-c", "assert h.pread(512, 0) == b'\\x01' * 512"
        )
        out = await run(
            "qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", uri(srv, "good"), good
        )
        assert "identical" in out.lower()


def test_check_cli_exit_statuses(tmp_path: Path) -> None:
    import subprocess
    import sys

    require_tools("qemu-img", "qemu-io")
    path = _base(tmp_path)
    _leak(path)
    argv = [sys.executable, "-m", "nbdserve", "img", "check", "--output", "json", str(path)]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == 3
    assert json.loads(result.stdout)["leaks"] == 1
    result = subprocess.run([*argv, "-r", "leaks"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
    shutil.copy(path, tmp_path / "copy.qcow2")
    assert_clean(tmp_path / "copy.qcow2")


@pytest.mark.parametrize("name", sorted(MATRIX))
async def test_check_matches_qemu_on_the_matrix(tmp_path: Path, name: str) -> None:
    require_tools("qemu-img", "qemu-io")
    path = MATRIX[name](tmp_path)
    theirs = qemu_img_check(path)
    ours = await check_image(str(path), None)
    assert ours.exit_status() == theirs["exit"] == 0, ours.messages
    # qemu-img leaves out the counters that are zero
    assert ours.allocated_clusters == theirs.get("allocated-clusters", 0)
    assert ours.compressed_clusters == theirs.get("compressed-clusters", 0)
    assert ours.fragmented_clusters == theirs.get("fragmented-clusters", 0)
    assert ours.total_clusters == theirs["total-clusters"]
    assert ours.image_end_offset == theirs["image-end-offset"]


async def test_persistent_bitmaps_are_counted_and_survive_repair(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    path = _base(tmp_path)
    qemu_img("bitmap", "--add", path, "b1")
    qemu_io(path, "write -P 9 2m 128k")
    theirs = qemu_img_check(path)
    ours = await check_image(str(path), None)
    assert ours.exit_status() == theirs["exit"] == 0, ours.messages
    assert ours.image_end_offset == theirs["image-end-offset"]
    _leak(path)
    report = await check_image(str(path), "all")
    assert report.exit_status() == 0, report.messages
    assert_clean(path)
    info = json.loads(qemu_img("info", "--output=json", path))
    assert info["format-specific"]["data"]["bitmaps"][0]["name"] == "b1"
    with pytest.raises(InvalidImageError, match="bitmaps"):
        await open_chain(str(path), ChainOptions(read_only=False))


async def test_corrupt_refcounts_never_let_writes_overwrite_metadata(tmp_path: Path) -> None:
    """With the L2 table's refcount zeroed, the allocator would hand it out: refused."""
    require_tools("qemu-img", "qemu-io")
    path = _base(tmp_path)
    l2 = P.u64(path, P.l1_entry_at(path, 0)) & 0x00FFFFFFFFFFFE00
    P.put_u16(path, P.refcount_entry_at(path, l2 // P.cluster_size(path)), 0)
    before = path.read_bytes()[l2 : l2 + 65536]
    chain = await open_chain(str(path), ChainOptions(read_only=False))
    dev = BlockDevice(chain.top)

    async def fill() -> None:
        for off in range(1 << 20, 4 << 20, 65536):  # allocations walk up from the start
            await dev.write(off, b"z" * 65536)

    try:
        with pytest.raises(CorruptImageError, match="overlaps"):
            await fill()
    finally:
        await chain.aclose()
    assert path.read_bytes()[l2 : l2 + 65536] == before
