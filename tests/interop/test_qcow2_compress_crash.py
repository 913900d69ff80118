"""compress = true survives SIGKILL: nothing flushed is lost, qemu-img check -r leaks repairs.

Like tests/reliability/test_crash_consistency.py, with compressible data so
that the unit writes (one 4 KiB cluster each) are stored as compressed
clusters and pass through the compressed-write cache.  Each round starts
``python -m nbdserve serve --config`` on a Unix socket, verifies the disk
against the model (every unit holds its last durable value or a later one),
runs a pipelined workload (writes, FUA writes, zero writes, trims, flushes,
live reads, many of them served from the write cache) until a timer SIGKILLs
the server, and recovers: ``qemu-img check`` must find no corruption, and
leaks (references taken for extents whose L2 entries never reached the disk)
are repaired with ``qemu-img check -r leaks``.  After the last round a clean
shutdown must leave a clean image that holds compressed clusters.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
import trio

from tests.conftest import require_tools
from tests.helpers.checks import CheckResult, assert_clean, qemu_img_check
from tests.helpers.client import NbdClient
from tests.helpers.crash import UNIT, UnitModel, Workload, kill_after, read_all, verify
from tests.helpers.images import direct_io_supported
from tests.helpers.server import run, server_process

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 8 * MiB
UNITS = SIZE // UNIT
KILLS = 3

VARIANTS = {
    # name: (compression type, cache mode, compress_cache_size)
    "zlib-writeback": ("zlib", "writeback", 256 * 1024),
    "zstd-none": ("zstd", "none", 64 * 1024),
    "zlib-none-nocache": ("zlib", "none", 0),
}


class CompressibleWorkload(Workload):
    """The crash workload with values that compress (the tag still names the request)."""

    def _value(self, unit: int) -> bytes:
        tag = b"NBDT" + struct.pack("<III", self.round_no, self.stats.sent, unit)
        body = bytearray(tag)
        while len(body) < UNIT:
            k = self.rng.randrange(16, 600)
            if self.rng.random() < 0.3:
                body += self.rng.randbytes(k)
            else:
                body += bytes([self.rng.randrange(256)]) * k
        return bytes(body[:UNIT])


def _config(d: Path, image: Path, sock: Path, cache: str, cache_size: int) -> Path:
    path = d / "nbdserve.toml"
    path.write_text(
        f"""
[server]
socket = "{sock}"
port = 0

[[export]]
name = ""
path = "{image}"
format = "qcow2"
cache = "{cache}"

[export.settings]
compress = true
compress_cache_size = {cache_size}
"""
    )
    return path


async def _connect(sock: Path) -> tuple[NbdClient, int]:
    client = await NbdClient.connect_unix(str(sock))
    info = await client.go("")
    assert info.size == SIZE
    return client, info.flags


async def _recover(image: Path, where: str) -> int:
    """qemu-img check: no corruption; leaks repaired with -r leaks.  Returns leaks."""
    result = await qemu_img_check(image, "qcow2")
    _assert_no_corruption(result, where)
    if result.status == 0:
        return 0
    repaired = await qemu_img_check(image, "qcow2", repair="leaks")
    _assert_no_corruption(repaired, where)
    clean = await qemu_img_check(image, "qcow2")
    assert clean.status == 0, f"{where}: not clean after -r leaks: {clean}"
    return result.leaks


def _assert_no_corruption(result: CheckResult, where: str) -> None:
    assert result.status in (0, 3), f"{where}: check failed: {result}"
    assert result.corruptions == 0, f"{where}: corruption: {result}"


@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_sigkill_during_compressed_writes(tmp_path: Path, variant: str) -> None:
    require_tools("qemu-img")
    compression, cache, cache_size = VARIANTS[variant]
    if cache == "none" and not direct_io_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    rng = random.Random(variant)
    image = tmp_path / "disk.qcow2"
    await run(
        "qemu-img", "create", "-q", "-f", "qcow2",
        "-o", f"cluster_size=4096,compression_type={compression}", image, str(SIZE),
    )  # fmt: skip
    sock = tmp_path / "nbd.sock"
    config = _config(tmp_path, image, sock, cache, cache_size)
    argv = ["serve", "--config", str(config)]
    zero_unit = bytes(UNIT)
    model = UnitModel([zero_unit] * UNITS, [zero_unit] * UNITS)
    leaks = flushes = 0
    for round_no in range(KILLS):
        where = f"{variant} round {round_no}"
        with server_process(argv, socket_path=str(sock)) as proc:
            client, flags = await _connect(sock)
            contents = await read_all(client, UNITS)
            verdict = verify(model, contents)
            assert not verdict.failures, f"{where}: " + "\n".join(verdict.failures[:10])
            model = UnitModel(contents, [zero_unit] * UNITS)
            workload = CompressibleWorkload(
                client, model, rng, round_no=round_no, export_flags=flags
            )
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(kill_after, proc.pid, rng.uniform(0.3, 0.8))
                    stats = await workload.run()
            await client.aclose()
            proc.wait(10)
        sock.unlink(missing_ok=True)
        assert not stats.errors, f"{where}: " + "\n".join(stats.errors[:10])
        assert stats.writes_acked > 0, f"{where}: the server died before any write"
        flushes += stats.flushes_acked
        leaks += await _recover(image, where)
    with server_process(argv, socket_path=str(sock)):
        client, _ = await _connect(sock)
        verdict = verify(model, await read_all(client, UNITS))
        assert not verdict.failures, f"{variant} final: " + "\n".join(verdict.failures[:10])
        await client.disconnect()
        await client.aclose()
    final = await assert_clean(image, "qcow2")
    assert int(final.report.get("compressed-clusters", 0)) > 0, final
    assert flushes > 0
    print(f"compress crash {variant}: kills={KILLS} flushes acked={flushes} leaks repaired={leaks}")
