"""Crash safety: SIGKILL the server while a client writes and flushes.

For every seed: a fresh FVD image over a raw base is served by a separate
``python -m nbdserve serve`` process; a client (nbdclient's connection, which
knows WRITE and FLUSH) writes 4 KiB units (partial 64 KiB blocks, so the
server copies-on-write) and flushes now and then, with prefetch running
for even seeds, until a timer SIGKILLs the
server at a random moment.  Afterwards:

* ``nbdserve img check`` finds no corruption in the unclean image;
* opened again (recovery), every unit holds its value as of the last
  completed FLUSH, or a value written after that FLUSH was sent: nothing
  acknowledged before the FLUSH is lost and nothing reads as garbage;
* after the clean close that follows recovery, ``img check`` is clean.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import trio

from nbdserve.block.nbdclient import NbdAddress, NbdConnection
from nbdserve.errors import HostIOError
from tests.helpers.checks import nbdserve_img_check
from tests.helpers.server import server_process
from tests.unit.block.fvd.helpers import make_base, make_image, open_image

pytestmark = pytest.mark.interop

KIB = 1024
MIB = 1024 * 1024
UNIT = 4 * KIB
SIZE = 4 * MIB
DEFAULT_SEEDS = [101, 202, 303, 404, 505]


async def img_check(path: Path, repair: str | None = None) -> tuple[int, dict[str, object]]:
    result = await nbdserve_img_check(path, "fvd", repair)
    return result.status, result.report


async def crash_once(tmp_path: Path, seed: int) -> int:
    rng = random.Random(seed)
    d = tmp_path / f"seed{seed}"
    d.mkdir()
    base = make_base(d / "base.raw", 3 * MIB, seed=seed)
    options = {"block_size": "64k", "journal_size": rng.choice(["4k", "64k", "1M"])}
    if seed % 2:
        options.update(compact="on", chunk_size="256k")
    if seed % 3 == 0:
        options["data_file"] = "data.raw"
    if seed % 2 == 0:  # prefetch copies the base while the client writes
        options.update(prefetch_start_delay="0", bytes_per_prefetch="256k")
    await make_image(d / "img.fvd", SIZE, "base.raw", **options)
    current = [base[i : i + UNIT] if i < len(base) else bytes(UNIT) for i in range(0, SIZE, UNIT)]
    durable = list(current)
    later: list[set[bytes]] = [set() for _ in current]
    sock = str(d / "s.sock")
    ops = 0
    with server_process(
        ["serve", str(d / "img.fvd"), "-k", sock, "-x", "disk"], socket_path=sock
    ) as proc:
        conn = await NbdConnection.connect(NbdAddress("disk", socket=sock))

        async def killer() -> None:
            await trio.sleep(rng.uniform(0.05, 0.6))
            os.kill(proc.pid, signal.SIGKILL)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(killer)
            try:
                with trio.fail_after(30):
                    while True:
                        if rng.random() < 0.15:
                            pending = list(current)
                            await conn.flush()
                            durable = pending
                            later = [set() for _ in current]
                        else:
                            first = rng.randrange(0, SIZE // UNIT)
                            count = min(rng.randrange(1, 8), SIZE // UNIT - first)
                            for u in range(first, first + count):
                                value = seed.to_bytes(4, "little") + ops.to_bytes(4, "little")
                                current[u] = value + rng.randbytes(UNIT - 8)
                                later[u].add(current[u])
                            await conn.write(first * UNIT, b"".join(current[first : first + count]))
                        ops += 1
            except HostIOError:
                pass  # the server died under us
        await trio.aclose_forcefully(conn._stream)
        proc.wait(10)
    status, report = await img_check(d / "img.fvd")
    assert status in (0, 3), report  # leaks are possible after a crash, corruption is not
    assert report["corruptions"] == 0
    chain, dev = await open_image(d / "img.fvd")
    got = await dev.read(0, SIZE)
    await chain.aclose()
    for u in range(SIZE // UNIT):
        value = got[u * UNIT : (u + 1) * UNIT]
        assert value == durable[u] or value in later[u], f"seed {seed}: unit {u} lost or garbage"
    status, report = await img_check(d / "img.fvd")
    if status == 3:
        status, report = await img_check(d / "img.fvd", "leaks")
        status, report = await img_check(d / "img.fvd")
    assert status == 0, report
    return ops


@pytest.mark.parametrize("seed", DEFAULT_SEEDS)
async def test_sigkill_during_writes_with_flush(tmp_path: Path, seed: int) -> None:
    ops = await crash_once(tmp_path, seed)
    print(f"seed={seed} ops_before_kill={ops}")
    assert ops > 0


@pytest.mark.slow
async def test_sigkill_soak(tmp_path: Path) -> None:
    for seed in range(1000, 1060):
        await crash_once(tmp_path, seed)
