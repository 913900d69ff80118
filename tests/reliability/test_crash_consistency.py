"""Crash consistency: SIGKILL a serving process at random moments, recover, verify.

For each format variant (raw; qcow2 without and with a qcow2 backing file;
parallels; FVD without and with a raw base) one image lives through a series
of rounds.  A round:

1. starts ``python -m nbdserve serve`` on a Unix socket;
2. reads the whole disk and checks it against the model of the previous
   round (tests/helpers/crash.py): every unit holds its last durable value
   or a value written after it, bytes never hold anything else;
3. runs a seeded pipelined workload (writes, FUA writes, zero writes, trims,
   flushes, reads checked live) until a timer SIGKILLs the server;
4. recovers as an operator would: parallels images left ``inuse`` are
   repaired with ``nbdserve img check --repair all`` (the documented
   recovery); then the format's checker (``qemu-img check`` for qcow2 and
   parallels, ``nbdserve img check`` for FVD) must find no corruption, and
   leaks are repaired (``-r all``) until the image checks clean.

The contents read in step 2 of the next round are the recovered ones, so the
repair is covered too.  After the last round a final server verifies, shuts
down cleanly, and the image must then check clean without repair.

Kill points per variant: ``DEFAULT_KILLS`` in the default run, ``SOAK_KILLS``
with ``--run-slow``.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from nbdserve.block.parallels.structs import INUSE_MAGIC
from tests.conftest import require_tools
from tests.helpers.checks import CheckResult, assert_clean, image_check, nbdserve_img_check
from tests.helpers.client import NbdClient
from tests.helpers.crash import (
    UNIT,
    ZERO_UNIT,
    UnitModel,
    Workload,
    WorkloadStats,
    kill_after,
    read_all,
    verify,
)
from tests.helpers.server import run, server_process
from tests.unit.block.parallels.images import header_fields

pytestmark = pytest.mark.interop

MIB = 1 << 20
SIZE = 8 * MIB
UNITS = SIZE // UNIT
DEFAULT_KILLS = 3
SOAK_KILLS = 50


# ---- variants -----------------------------------------------------------


@dataclass
class Image:
    path: Path
    fmt: str
    base_units: list[bytes]
    description: str


def _units(data: bytes) -> list[bytes]:
    data = data.ljust(SIZE, b"\0")
    return [data[i * UNIT : (i + 1) * UNIT] for i in range(UNITS)]


def _base_content(rng: random.Random) -> bytes:
    """Random data with zero holes, so a base has unallocated ranges too."""
    data = bytearray(rng.randbytes(SIZE))
    for _ in range(8):
        lo = rng.randrange(0, SIZE, UNIT)
        hi = min(SIZE, lo + rng.randrange(UNIT, MIB, UNIT))
        data[lo:hi] = bytes(hi - lo)
    return bytes(data)


async def setup_raw(d: Path, rng: random.Random) -> Image:
    path = d / "disk.raw"
    path.write_bytes(b"")
    with path.open("r+b") as f:
        f.truncate(SIZE)
    return Image(path, "raw", _units(b""), "raw")


def _qcow2_options(rng: random.Random) -> str:
    options = [f"cluster_size={rng.choice([4096, 16384, 65536])}"]
    if rng.random() < 0.3:
        options.append("lazy_refcounts=on")
    if rng.random() < 0.3:
        options.append(f"refcount_bits={rng.choice([1, 4, 64])}")
    return ",".join(options)


async def setup_qcow2(d: Path, rng: random.Random) -> Image:
    path = d / "disk.qcow2"
    options = _qcow2_options(rng)
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, path, str(SIZE))
    return Image(path, "qcow2", _units(b""), f"qcow2 {options}")


async def setup_qcow2_backing(d: Path, rng: random.Random) -> Image:
    content = _base_content(rng)
    (d / "base.raw").write_bytes(content)
    base_options = f"cluster_size={rng.choice([16384, 65536])}"
    await run(
        "qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", base_options,
        d / "base.raw", d / "base.qcow2",
    )  # fmt: skip
    (d / "base.raw").unlink()
    path = d / "disk.qcow2"
    options = _qcow2_options(rng)
    await run(
        "qemu-img", "create", "-q", "-f", "qcow2", "-o", options,
        "-b", "base.qcow2", "-F", "qcow2", path, str(SIZE),
    )  # fmt: skip
    return Image(path, "qcow2", _units(content), f"qcow2 {options} over qcow2 {base_options}")


async def setup_parallels(d: Path, rng: random.Random) -> Image:
    path = d / "disk.img"
    options = f"cluster_size={rng.choice([4096, 65536, 1 << 20])}"
    await run("qemu-img", "create", "-q", "-f", "parallels", "-o", options, path, str(SIZE))
    return Image(path, "parallels", _units(b""), f"parallels {options}")


def _fvd_options(rng: random.Random) -> str:
    options = [
        f"block_size={rng.choice(['4k', '64k'])}",
        f"journal_size={rng.choice(['4k', '64k', '1M'])}",
    ]
    if rng.random() < 0.5:
        options += ["compact=on", "chunk_size=256k"]
    return ",".join(options)


async def _nbdserve_create(*argv: str | Path) -> None:
    await run(sys.executable, "-m", "nbdserve", "img", "create", "-q", *argv)


async def setup_fvd(d: Path, rng: random.Random) -> Image:
    path = d / "disk.fvd"
    options = _fvd_options(rng)
    await _nbdserve_create("-f", "fvd", "-o", options, path, str(SIZE))
    return Image(path, "fvd", _units(b""), f"fvd {options}")


async def setup_fvd_base(d: Path, rng: random.Random) -> Image:
    content = _base_content(rng)
    (d / "base.raw").write_bytes(content)
    path = d / "disk.fvd"
    options = _fvd_options(rng)
    if rng.random() < 0.5:  # prefetch copies the base while the client writes
        options += ",prefetch_start_delay=0,bytes_per_prefetch=256k"
    await _nbdserve_create(
        "-f", "fvd", "-o", options, "-b", "base.raw", "-F", "raw", path, str(SIZE)
    )
    return Image(path, "fvd", _units(content), f"fvd {options} over raw")


VARIANTS: dict[str, Callable[[Path, random.Random], Awaitable[Image]]] = {
    "raw": setup_raw,
    "qcow2": setup_qcow2,
    "qcow2-backing": setup_qcow2_backing,
    "parallels": setup_parallels,
    "fvd": setup_fvd,
    "fvd-base": setup_fvd_base,
}


# ---- recovery -----------------------------------------------------------


@dataclass
class Recovery:
    inuse_repairs: int = 0
    leak_repairs: int = 0
    leaked_clusters: int = 0


async def recover(image: Image, recovery: Recovery, where: str) -> None:
    """What an operator does after a crash; fails on any corruption."""
    if image.fmt == "raw":
        return
    if image.fmt == "parallels" and header_fields(image.path)["inuse"] == INUSE_MAGIC:
        repaired = await nbdserve_img_check(image.path, "parallels", repair="all")
        assert repaired.status == 0, f"{where}: parallels repair: {repaired}"
        recovery.inuse_repairs += 1
    result = await image_check(image.path, image.fmt)
    _assert_no_corruption(result, where)
    if result.status == 3:
        recovery.leak_repairs += 1
        recovery.leaked_clusters += result.leaks
        repaired = await image_check(image.path, image.fmt, repair="all")
        _assert_no_corruption(repaired, where)
        result = await image_check(image.path, image.fmt)
    assert result.status == 0, f"{where}: not clean after repair: {result}"
    assert result.leaks == 0, f"{where}: leaks after repair: {result}"


def _assert_no_corruption(result: CheckResult, where: str) -> None:
    assert result.status in (0, 3), f"{where}: check failed: {result}"
    assert result.corruptions == 0, f"{where}: corruption: {result}"


# ---- rounds -------------------------------------------------------------


@dataclass
class Summary:
    description: str = ""
    kills: int = 0
    requests: int = 0
    flushes_acked: int = 0
    torn_units: int = 0
    recovery: Recovery = field(default_factory=Recovery)

    def add(self, stats: WorkloadStats) -> None:
        self.requests += stats.sent
        self.flushes_acked += stats.flushes_acked


async def _connect(sock: Path) -> tuple[NbdClient, int]:
    client = await NbdClient.connect_unix(str(sock))
    info = await client.go("")
    assert info.size == SIZE
    return client, info.flags


async def _verify_on_server(
    client: NbdClient, model: UnitModel, where: str, summary: Summary
) -> list[bytes]:
    contents = await read_all(client, UNITS)
    verdict = verify(model, contents)
    summary.torn_units += verdict.torn_units
    assert not verdict.failures, f"{where}: " + "\n".join(verdict.failures[:10])
    return contents


def _serve_argv(image: Image, sock: Path) -> list[str]:
    return ["serve", "-f", image.fmt, "-k", str(sock), str(image.path)]


async def crash_rounds(d: Path, variant: str, seed: int, kills: int) -> Summary:
    rng = random.Random(seed)
    image = await VARIANTS[variant](d, rng)
    summary = Summary(description=image.description)
    model = UnitModel(image.base_units, image.base_units)
    sock = d / "nbd.sock"
    for round_no in range(kills):
        where = f"{variant} seed {seed} round {round_no} ({image.description})"
        with server_process(_serve_argv(image, sock), socket_path=str(sock)) as proc:
            client, flags = await _connect(sock)
            contents = await _verify_on_server(client, model, where, summary)
            model = UnitModel(contents, image.base_units)
            workload = Workload(client, model, rng, round_no=round_no, export_flags=flags)
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(kill_after, proc.pid, rng.uniform(0.0, 0.6))
                    stats = await workload.run()
            await client.aclose()
            proc.wait(10)
        sock.unlink(missing_ok=True)
        assert not stats.errors, f"{where}: " + "\n".join(stats.errors[:10])
        summary.kills += 1
        summary.add(stats)
        await recover(image, summary.recovery, where)
    where = f"{variant} seed {seed} final ({image.description})"
    with server_process(_serve_argv(image, sock), socket_path=str(sock)):
        client, _ = await _connect(sock)
        await _verify_on_server(client, model, where, summary)
        await client.disconnect()
        await client.aclose()
    # a clean shutdown leaves a clean image, with no repair
    if image.fmt != "raw":
        await assert_clean(image.path, image.fmt)
    return summary


def _report(variant: str, summary: Summary, elapsed: float) -> None:
    r = summary.recovery
    print(
        f"crash {variant} [{summary.description}]: kills survived={summary.kills} "
        f"requests={summary.requests} flushes acked={summary.flushes_acked} "
        f"torn units={summary.torn_units} inuse repairs={r.inuse_repairs} "
        f"leak repairs={r.leak_repairs} leaked clusters={r.leaked_clusters} "
        f"time={elapsed:.1f}s"
    )


def _require(variant: str) -> None:
    if variant.startswith(("qcow2", "parallels")):
        require_tools("qemu-img")


@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_sigkill_recovery(tmp_path: Path, variant: str) -> None:
    _require(variant)
    start = time.monotonic()
    summary = await crash_rounds(tmp_path, variant, seed=7, kills=DEFAULT_KILLS)
    _report(variant, summary, time.monotonic() - start)
    assert summary.kills == DEFAULT_KILLS


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_sigkill_recovery_soak(tmp_path: Path, variant: str) -> None:
    _require(variant)
    start = time.monotonic()
    total = Summary()
    # several images per variant (each seed draws other cluster sizes/options)
    for seed in range(5):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        summary = await crash_rounds(d, variant, seed=1000 + seed, kills=SOAK_KILLS // 5)
        _report(variant, summary, time.monotonic() - start)
        total.kills += summary.kills
        total.requests += summary.requests
        total.torn_units += summary.torn_units
    print(f"crash soak {variant}: kills survived={total.kills} requests={total.requests}")
    assert total.kills >= SOAK_KILLS


def test_model_rejects_lost_and_garbage_units() -> None:
    """The checker can fail: a lost durable write, garbage and a torn unit are told apart."""
    old, new, newer = (bytes([i]) * UNIT for i in (1, 2, 3))
    model = UnitModel([old, old, old], [ZERO_UNIT] * 3)
    e = model.apply_write(0, [new, new, new])
    model.mark_durable(e)
    model.apply_write(0, [newer])
    assert verify(model, [old, new, new]).failures  # durable write lost
    assert not verify(model, [newer, new, new]).failures  # later write may survive
    assert verify(model, [new, bytes([9]) * UNIT, new]).failures  # garbage
    torn = new[:512] + newer[512:]
    verdict = verify(model, [torn, new, new])
    assert not verdict.failures
    assert verdict.torn_units == 1
    model.apply_trim(1, 1)
    assert not verify(model, [new, ZERO_UNIT, new]).failures  # trim may read as zeros
