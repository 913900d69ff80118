"""Seed images for the fuzzers: small, real, with a few clusters written.

qcow2 and parallels seeds are made by qemu-img/qemu-io, FVD seeds by
``nbdserve img create`` and written through the FVD driver.  Every seed lives
in its own directory with its base files, so a mutated copy written next to it
("fuzz.img") finds the same backing files.  The commands are fixed, so a seed
is the same image on every run with the same qemu version; corpus entries name
seeds and describe mutations symbolically (layouts.py) so they survive small
layout changes anyway.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from tests.fuzz.layouts import LAYOUTS, Layout

KIB = 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class Seed:
    name: str
    fmt: str
    directory: Path
    data: bytes
    layout: Layout

    @property
    def target(self) -> Path:
        """Where a mutated copy is written (next to the seed's base files)."""
        return self.directory / "fuzz.img"


def _run(*argv: str | Path, cwd: Path) -> None:
    subprocess.run([str(a) for a in argv], cwd=cwd, check=True, capture_output=True, timeout=60)


def _qemu_img(d: Path, *argv: str | Path) -> None:
    _run("qemu-img", *argv, cwd=d)


def _qemu_io(d: Path, fmt: str, path: str, *cmds: str) -> None:
    argv: list[str | Path] = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run(
        [*map(str, argv), path], cwd=d, check=False, capture_output=True, timeout=60
    )  # "abort" makes qemu-io die on purpose


WRITES = ["write -P 0x11 0 1k", "write -P 0x22 100k 3k", "write -P 0x33 300k 8k"]


def _qcow2_v3_512(d: Path) -> None:
    _qemu_img(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "seed", "512K")
    _qemu_io(d, "qcow2", "seed", *WRITES, "write -z 200k 1k")


def _qcow2_v2(d: Path) -> None:
    options = "compat=0.10,cluster_size=4096"
    _qemu_img(d, "create", "-q", "-f", "qcow2", "-o", options, "seed", "1M")
    _qemu_io(d, "qcow2", "seed", *WRITES)


def _qcow2_extended_l2(d: Path) -> None:
    options = "extended_l2=on,cluster_size=16k"
    _qemu_img(d, "create", "-q", "-f", "qcow2", "-o", options, "seed", "1M")
    _qemu_io(d, "qcow2", "seed", *WRITES, "write -z 520k 1k")


def _qcow2_compressed(d: Path) -> None:
    (d / "src.raw").write_bytes(b"compressible " * 40000)
    options = "cluster_size=4096"
    _qemu_img(d, "convert", "-q", "-c", "-O", "qcow2", "-o", options, "src.raw", "seed")
    (d / "src.raw").unlink()


def _qcow2_snapshot(d: Path) -> None:
    _qemu_img(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "seed", "1M")
    _qemu_io(d, "qcow2", "seed", *WRITES)
    _qemu_img(d, "snapshot", "-c", "snap1", "seed")
    _qemu_io(d, "qcow2", "seed", "write -P 0x44 0 6k")


def _qcow2_backing(d: Path) -> None:
    (d / "base.raw").write_bytes(random.Random(5).randbytes(MIB))
    _qemu_img(
        d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
        "-b", "base.raw", "-F", "raw", "seed", "1M",
    )  # fmt: skip
    _qemu_io(d, "qcow2", "seed", *WRITES, "write -z 600k 4k")


def _qcow2_dirty(d: Path) -> None:
    options = "lazy_refcounts=on,cluster_size=4096,refcount_bits=4"
    _qemu_img(d, "create", "-q", "-f", "qcow2", "-o", options, "seed", "1M")
    _qemu_io(d, "qcow2", "seed", *WRITES, "abort")


def _parallels(cluster: str) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        options = f"cluster_size={cluster}"
        _qemu_img(d, "create", "-q", "-f", "parallels", "-o", options, "seed", "1M")
        _qemu_io(d, "parallels", "seed", *WRITES)

    return build


def _fvd(options: str, base: bool, crash: bool) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        argv = [sys.executable, "-m", "nbdserve", "img", "create", "-q", "-f", "fvd"]
        argv += ["-o", options]
        if base:
            (d / "base.raw").write_bytes(random.Random(6).randbytes(512 * KIB))
            argv += ["-b", "base.raw", "-F", "raw"]
        _run(*argv, "seed", "1M", cwd=d)
        trio.run(_fvd_writes, d / "seed", crash)

    return build


async def _fvd_writes(path: Path, crash: bool) -> None:
    from tests.unit.block.fvd.helpers import crash as crash_chain
    from tests.unit.block.fvd.helpers import open_image

    chain, dev = await open_image(path, prefetch_start_delay=-1)
    for i, (offset, length) in enumerate([(0, 1024), (100 * KIB, 3 * KIB), (300 * KIB, 8 * KIB)]):
        await dev.write(offset, bytes([0x11 * (i + 1)]) * length)
        await dev.flush()
    if crash:  # leave journal records and clean_shutdown = 0 behind
        await dev.write(700 * KIB, b"\x55" * 4096)
        await dev.flush()
        await crash_chain(chain)
    else:
        await chain.aclose()


SEEDS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "qcow2-v3-512": ("qcow2", _qcow2_v3_512),
    "qcow2-v2": ("qcow2", _qcow2_v2),
    "qcow2-extl2": ("qcow2", _qcow2_extended_l2),
    "qcow2-compressed": ("qcow2", _qcow2_compressed),
    "qcow2-snapshot": ("qcow2", _qcow2_snapshot),
    "qcow2-backing": ("qcow2", _qcow2_backing),
    "qcow2-dirty": ("qcow2", _qcow2_dirty),
    "parallels-4k": ("parallels", _parallels("4096")),
    "parallels-64k": ("parallels", _parallels("65536")),
    "fvd-plain": ("fvd", _fvd("block_size=4k,journal_size=8k", base=False, crash=False)),
    "fvd-compact-base": (
        "fvd",
        _fvd(
            "block_size=4k,compact=on,chunk_size=16k,journal_size=8k,storage_grow_unit=64k",
            base=True,
            crash=True,
        ),
    ),
    "fvd-base-dirty": ("fvd", _fvd("block_size=4k,journal_size=8k", base=True, crash=True)),
}


def formats_available() -> set[str]:
    have = {"fvd"}
    if shutil.which("qemu-img") and shutil.which("qemu-io"):
        have |= {"qcow2", "parallels"}
    return have


def build_seed(root: Path, name: str) -> Seed:
    fmt, build = SEEDS[name]
    d = root / name
    if not (d / "seed").exists():
        d.mkdir(parents=True, exist_ok=True)
        build(d)
    data = (d / "seed").read_bytes()
    return Seed(name, fmt, d, data, LAYOUTS[fmt](data))
