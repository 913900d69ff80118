"""Corrupt compressed clusters: an untrusted image must not make a read allocate
more than a cluster (a zstd "decompression bomb"), and a cluster that does not
decompress to exactly one cluster is an I/O error, as in QEMU."""

from __future__ import annotations

import io
import os
import subprocess
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from nbdserve.block.chain import ChainOptions, open_chain
from nbdserve.block.device import BlockDevice
from nbdserve.errors import CorruptImageError
from tests.conftest import require_tools
from tests.helpers import qcow2_patch as P
from tests.helpers.images import qemu_img

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
BOMB_CONTENT = 256 * MiB  # what the patched frame declares and holds (zeros)
PEAK_LIMIT = 16 * MiB


def _compressed_zstd_image(tmp_path: Path, cluster_size: int) -> tuple[Path, bytes]:
    """A zstd image whose cluster 0 QEMU compressed; it is mostly incompressible,
    so its compressed extent has room for the frames the tests put there."""
    raw, img = tmp_path / "img.raw", tmp_path / "img.qcow2"
    first = os.urandom(cluster_size * 3 // 4) + b"\x07" * (cluster_size // 4)
    raw.write_bytes(first + bytes(4 * MiB - cluster_size))
    qemu_img(
        "convert", "-q", "-c", "-f", "raw", "-O", "qcow2",
        "-o", f"cluster_size={cluster_size},compression_type=zstd", raw, img,
    )  # fmt: skip
    return img, first


def _extent(path: Path) -> tuple[int, int]:
    """(host offset, bytes) of cluster 0's compressed extent (qcow2.txt)."""
    cluster_bits = P.u32(path, 20)
    entry = P.u64(path, P.l2_entry_at(path, 0))
    assert entry & (1 << 62), "cluster 0 is not compressed"
    shift = 62 - (cluster_bits - 8)
    offset = entry & ((1 << shift) - 1)
    sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, sectors * 512 - offset % 512


def _bomb_frame(content: int) -> bytes:
    """A small zstd frame that declares, and decompresses to, ``content`` zero bytes."""
    out = io.BytesIO()
    chunk = bytes(MiB)
    writer = zstandard.ZstdCompressor(level=1).stream_writer(out, size=content, closefd=False)
    with writer:
        for _ in range(content // MiB):
            writer.write(chunk)
    return out.getvalue()


def _patch_extent(path: Path, frame: bytes) -> None:
    offset, nbytes = _extent(path)
    assert len(frame) <= nbytes, (len(frame), nbytes)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(frame + bytes(nbytes - len(frame)))


async def _read_cluster0(path: Path) -> tuple[bytes | Exception, int]:
    """Cluster 0's first 4 KiB (or the error) and the Python heap peak of the read."""
    chain = await open_chain(str(path), ChainOptions(fmt="qcow2", read_only=True))
    try:
        dev = BlockDevice(chain.top)
        tracemalloc.start()
        try:
            result: bytes | Exception = await dev.read(0, 4096)
        except CorruptImageError as exc:
            result = exc
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        return result, peak
    finally:
        await chain.aclose()


@pytest.mark.parametrize("cluster_size", [64 * 1024, 2 * MiB])
async def test_zstd_bomb_is_an_io_error_without_a_big_allocation(
    tmp_path: Path, cluster_size: int
) -> None:
    require_tools("qemu-img", "qemu-io")
    img, expected = _compressed_zstd_image(tmp_path, cluster_size)
    data, _ = await _read_cluster0(img)
    assert data == expected[:4096]  # the unpatched cluster reads as QEMU wrote it

    bomb = _bomb_frame(BOMB_CONTENT)
    assert zstandard.get_frame_parameters(bomb).content_size == BOMB_CONTENT
    _patch_extent(img, bomb)
    result, peak = await _read_cluster0(img)
    assert isinstance(result, CorruptImageError), result
    assert "decompresses to more than" in str(result)
    assert peak < PEAK_LIMIT, f"a 4 KiB read allocated {peak} bytes"
    # QEMU agrees the cluster is unreadable
    out = _qemu_io_output(img, "read 0 4k")
    assert "Input/output error" in out, out


@pytest.mark.parametrize("content", ["short", "long"])
async def test_zstd_frame_not_one_cluster_is_an_io_error(tmp_path: Path, content: str) -> None:
    require_tools("qemu-img", "qemu-io")
    cs = 64 * 1024
    img, _ = _compressed_zstd_image(tmp_path, cs)
    size = cs // 2 if content == "short" else cs + 512
    _patch_extent(img, zstandard.ZstdCompressor().compress(b"\x05" * size))
    result, _ = await _read_cluster0(img)
    assert isinstance(result, CorruptImageError), result


def _qemu_io_output(path: Path, cmd: str) -> str:
    result = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-r", "-c", cmd, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.stdout + result.stderr
