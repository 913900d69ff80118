"""qcow2 write path: every sequence of our writes leaves an image qemu-img check accepts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import trio

from nbdserve.block.chain import ChainOptions, open_chain
from nbdserve.block.device import BlockDevice
from nbdserve.block.qcow2 import create_image
from nbdserve.errors import NotSupportedError
from tests.conftest import require_tools
from tests.helpers.images import (
    assert_clean,
    qemu_img,
    qemu_img_map,
    qemu_io,
    read_driver,
    to_raw,
)
from tests.helpers.qcow2_matrix import MATRIX

pytestmark = pytest.mark.interop


async def _open(path: Path) -> tuple[BlockDevice, object]:
    chain = await open_chain(str(path), ChainOptions(read_only=False))
    return BlockDevice(chain.top), chain


async def _random_ops(dev: BlockDevice, model: bytearray, rng: random.Random, n: int) -> None:
    """Writes, zeroes, discards, flushes; discarded ranges adopt what the image shows."""
    size = len(model)
    cs = dev.top.header.cluster_size  # type: ignore[attr-defined]
    for _ in range(n):
        op = rng.random()
        off = rng.randrange(size)
        if rng.random() < 0.4:
            off = off // cs * cs
        ln = rng.randint(1, min(3 * cs + 4096, size - off))
        if op < 0.55:
            data = rng.randbytes(ln)
            await dev.write(off, data)
            model[off : off + ln] = data
        elif op < 0.8:
            await dev.write_zeroes(off, ln, may_unmap=rng.random() < 0.5)
            model[off : off + ln] = bytes(ln)
        elif op < 0.92:
            await dev.discard(off, ln)
            lo, hi = -(-off // cs) * cs, (off + ln) // cs * cs
            if hi > lo:
                model[lo:hi] = await dev.read(lo, hi - lo)
        else:
            await dev.flush()


@pytest.mark.parametrize("name", sorted(MATRIX))
async def test_random_writes_on_qemu_images_stay_clean(tmp_path: Path, name: str) -> None:
    """On every matrix image (snapshots, compressed, chains, data files, subclusters)."""
    require_tools("qemu-img", "qemu-io")
    path = MATRIX[name](tmp_path)
    model = bytearray(to_raw(path, tmp_path / "before.raw"))
    snap = None
    if "snapshot" in name:
        qemu_img("convert", "-l", "snapshot.name=snap1", "-O", "raw", path, tmp_path / "s.raw")
        snap = (tmp_path / "s.raw").read_bytes()
    dev, chain = await _open(path)
    try:
        await _random_ops(dev, model, random.Random(name), 60)
        assert await dev.read(0, len(model)) == bytes(model)
    finally:
        await chain.aclose()  # type: ignore[attr-defined]
    assert_clean(path)
    assert to_raw(path, tmp_path / "after.raw") == bytes(model)
    if snap is not None:
        qemu_img("convert", "-l", "snapshot.name=snap1", "-O", "raw", path, tmp_path / "s2.raw")
        assert (tmp_path / "s2.raw").read_bytes() == snap, "the snapshot's data changed"


@pytest.mark.parametrize(
    "opts",
    [
        {"cluster_size": "512", "refcount_bits": "64"},
        {"cluster_size": "512", "refcount_bits": "1"},
        {"cluster_size": "4K", "refcount_bits": "2"},
        {"cluster_size": "4K", "refcount_bits": "4"},
        {"cluster_size": "4K", "refcount_bits": "8"},
        {"cluster_size": "4K", "refcount_bits": "32"},
    ],
    ids=lambda o: f"{o['cluster_size']}-rc{o['refcount_bits']}",
)
async def test_refcount_widths_and_table_growth(tmp_path: Path, opts: dict[str, str]) -> None:
    require_tools("qemu-img")
    path = tmp_path / "img.qcow2"
    size = 6 << 20
    await create_image(str(path), size, dict(opts))
    before = json.loads(qemu_img("info", "--output=json", path))
    dev, chain = await _open(path)
    rng = random.Random(7)
    data = rng.randbytes(size)
    try:
        for off in range(0, size, 256 * 1024):  # fill everything: tables must grow
            await dev.write(off, data[off : off + 256 * 1024])
    finally:
        await chain.aclose()  # type: ignore[attr-defined]
    assert_clean(path)
    assert to_raw(path, tmp_path / "out.raw") == data
    assert before["virtual-size"] == size
    if opts["refcount_bits"] == "64":  # 64 blocks of 64 clusters: 2 MiB; the table moved
        assert int.from_bytes(path.read_bytes()[48:56], "big") != 512


async def test_concurrent_writes_to_one_unallocated_cluster(tmp_path: Path) -> None:
    """Many tasks write disjoint pieces of the same clusters over a backing file."""
    require_tools("qemu-img", "qemu-io")
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 0xee 0 4M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    model = bytearray(b"\xee" * (4 << 20))
    dev, chain = await _open(top)
    pieces = [(c * 65536 + i * 4096, bytes([i + 1]) * 1000) for c in range(4) for i in range(16)]
    random.Random(1).shuffle(pieces)
    try:
        async with trio.open_nursery() as nursery:
            for off, data in pieces:
                nursery.start_soon(dev.write, off, data)
                model[off : off + len(data)] = data
        assert await dev.read(0, 4 << 20) == bytes(model)
    finally:
        await chain.aclose()  # type: ignore[attr-defined]
    assert_clean(top)
    info = json.loads(qemu_img("check", "--output=json", top))
    assert info["allocated-clusters"] == 4  # each cluster allocated exactly once
    assert to_raw(top, tmp_path / "t.raw") == bytes(model)


async def test_zeroing_keeps_or_frees_clusters_like_qemu(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for p in (ours, theirs):
        qemu_img("create", "-q", "-f", "qcow2", p, "4M")
        qemu_io(p, "write -P 1 0 1M")
    qemu_io(theirs, "write -z 0 128k", "write -z -u 128k 128k", "write -z 2m 128k")
    dev, chain = await _open(ours)
    try:
        await dev.write_zeroes(0, 128 * 1024, may_unmap=False)
        await dev.write_zeroes(128 * 1024, 128 * 1024, may_unmap=True)
        await dev.write_zeroes(2 << 20, 128 * 1024, may_unmap=False, fast=True)
        with pytest.raises(NotSupportedError):  # part of a cluster: not fast
            await dev.write_zeroes(4096, 4096, fast=True)
    finally:
        await chain.aclose()  # type: ignore[attr-defined]
    assert_clean(ours)
    assert qemu_img_map(ours) == qemu_img_map(theirs)


async def test_v2_zeroing_with_backing_falls_back_to_data(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_io(base, "write -P 9 0 1M")
    top = tmp_path / "top.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2", top
    )
    dev, chain = await _open(top)
    try:
        with pytest.raises(NotSupportedError):
            await dev.write_zeroes(0, 65536, fast=True)
        await dev.write_zeroes(0, 65536)
        assert await dev.read(0, 65536) == bytes(65536)
        assert await dev.read(65536, 10) == b"\x09" * 10
    finally:
        await chain.aclose()  # type: ignore[attr-defined]
    assert_clean(top)


async def test_compressed_cluster_partially_rewritten(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "1M")
    qemu_io(src, "write -P 3 0 1M")
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", src, img)
    dev, chain = await _open(img)
    try:
        await dev.write(70000, b"x" * 100)
    finally:
        await chain.aclose()  # type: ignore[attr-defined]
    assert_clean(img)
    content = await read_driver(img)
    assert content[70000:70100] == b"x" * 100
    assert content[:70000] == b"\x03" * 70000
    check = json.loads(qemu_img("check", "--output=json", img))
    assert check["compressed-clusters"] == 15


async def test_graceful_close_leaves_a_sane_file_size(tmp_path: Path) -> None:
    require_tools("qemu-img")
    path = tmp_path / "img.qcow2"
    await create_image(str(path), 64 << 20, {})
    dev, chain = await _open(path)
    try:
        await dev.write(10 << 20, b"a" * 65536)
    finally:
        await chain.aclose()  # type: ignore[attr-defined]
    check = json.loads(qemu_img("check", "--output=json", path))
    assert path.stat().st_size <= check["image-end-offset"]
    assert path.stat().st_size < 1 << 20


async def _fio_verify(tmp_path: Path, size_mib: int, runtime_args: list[str]) -> None:
    from tests.helpers.server import export, run, running_server, uri

    require_tools("fio", "qemu-img", "qemu-io")
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", base, f"{size_mib}M")
    qemu_io(base, f"write -P 0x5c 0 {size_mib // 2}m")
    top = tmp_path / "top.qcow2"
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=16k",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top,
    )
    async with running_server(export(top, "fio", format="qcow2")) as srv:
        out = await run(
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            f"--uri={uri(srv, 'fio')}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            f"--size={size_mib}M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--randrepeat=1",
            "--output-format=json",
            *runtime_args,
            timeout=300,
        )
    doc = json.loads(out[out.index("{") :])
    job = doc["jobs"][0]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] >= size_mib * 1024 * 1024
    assert_clean(top)


async def test_fio_randwrite_verify_qcow2_overlay(tmp_path: Path) -> None:
    """4 KiB random writes (COW of 16 KiB clusters over a qcow2 base), then verify."""
    await _fio_verify(tmp_path, 16, [])


@pytest.mark.slow
async def test_fio_randwrite_verify_qcow2_overlay_large(tmp_path: Path) -> None:
    await _fio_verify(tmp_path, 256, [])


@pytest.mark.parametrize("seed", range(6))
async def test_cancelled_writes_leave_a_clean_image(tmp_path: Path, seed: int) -> None:
    """Cancel a crowd of allocating writes after a random number of scheduling steps."""
    require_tools("qemu-img", "qemu-io")
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 0xee 0 4M")
    top = tmp_path / "top.qcow2"
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top,
    )
    rng = random.Random(seed)
    dev, chain = await _open(top)
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                for _ in range(40):
                    off = rng.randrange(4 << 20)
                    n = rng.randint(1, min(70000, (4 << 20) - off))
                    if rng.random() < 0.7:
                        nursery.start_soon(dev.write, off, rng.randbytes(n))
                    else:
                        nursery.start_soon(dev.write_zeroes, off, n)
                for _ in range(rng.randint(0, 60)):
                    await trio.lowlevel.checkpoint()
                scope.cancel()
        await dev.write(0, b"still works")
    finally:
        await chain.aclose()  # type: ignore[attr-defined]
    assert_clean(top)


async def test_concurrent_clients_through_the_server(tmp_path: Path) -> None:
    """Several NBD connections write pieces of the same unallocated clusters at once."""
    from tests.helpers.server import export, nbdsh_argv, run, running_server, uri

    require_tools("qemu-img", "qemu-io", "nbdsh")
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_io(base, "write -P 0xee 0 1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    model = bytearray(b"\xee" * (1 << 20))
    scripts = []
    for client in range(4):
        lines = []
        for c in range(4):
            for k in range(8):
                off = c * 65536 + (client * 8 + k) * 2048
                lines.append(f"h.aio_pwrite(bytes([{client * 8 + k + 1}]) * 1500, {off})")
                model[off : off + 1500] = bytes([client * 8 + k + 1]) * 1500
        lines.append("while h.aio_in_flight() > 0: h.poll(-1)")
        lines.append("h.flush()")
        scripts.append("\n".join(lines))
    async with (
        running_server(export(top, "c", format="qcow2")) as srv,
        trio.open_nursery() as nursery,
    ):

        async def run_script(s: str) -> None:
            await run(*nbdsh_argv(), "-u", uri(srv, "c"), "-c", s)

        for script in scripts:
            nursery.start_soon(run_script, script)
    assert_clean(top)
    check = json.loads(qemu_img("check", "--output=json", top))
    assert check["allocated-clusters"] == 4
    assert to_raw(top, tmp_path / "t.raw") == bytes(model)


@pytest.mark.parametrize(
    "opts",
    [
        {"cluster_size": "2M", "extended_l2": "on"},
        {"cluster_size": "512", "compat": "0.10"},
        {"preallocation": "metadata", "extended_l2": "on"},
        {"lazy_refcounts": "on", "compression_type": "zstd"},
        {"data_file": "img.data"},
        {"data_file": "img.data", "data_file_raw": "on", "cluster_size": "4K"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
async def test_random_ops_on_created_images(tmp_path: Path, opts: dict[str, str]) -> None:
    require_tools("qemu-img")
    path = tmp_path / "img.qcow2"
    size = 8 << 20
    if "data_file" in opts:  # absolute, so qemu-img (7.2 resolves against its cwd) agrees
        opts = {**opts, "data_file": str(tmp_path / opts["data_file"])}
    await create_image(str(path), size, dict(opts))
    model = bytearray(size)
    dev, chain = await _open(path)
    try:
        await _random_ops(dev, model, random.Random(str(opts)), 60)
        assert await dev.read(0, size) == bytes(model)
    finally:
        await chain.aclose()  # type: ignore[attr-defined]
    assert_clean(path)
    assert to_raw(path, tmp_path / "out.raw") == bytes(model)
    if opts.get("data_file_raw") == "on":  # the raw data file alone shows the guest's bytes
        assert (tmp_path / "img.data").read_bytes() == bytes(model)
