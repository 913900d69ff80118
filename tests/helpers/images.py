"""qemu-img / qemu-io wrappers and qemu-img-map normalisation for image tests.

The synchronous helpers are for preparing images before a server runs; inside
a test that also runs an in-process server use the async ``arun`` (or
``tests.helpers.server.run``) so the event loop keeps serving.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tests.helpers.server import run as arun

__all__ = [
    "arun",
    "direct_io_supported",
    "assert_clean",
    "expected_nbd_maps",
    "chain_map_from_nbdinfo",
    "normalize_map",
    "qemu_img",
    "qemu_img_check",
    "qemu_img_map",
    "qemu_io",
    "read_driver",
    "to_raw",
]


def _run(
    argv: Sequence[str | Path], check: bool = True, cwd: str | Path | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, check=False, timeout=120, cwd=cwd
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


def qemu_img(*args: str | Path, check: bool = True, cwd: str | Path | None = None) -> str:
    """Run qemu-img (in ``cwd``: qemu creates relative data files there)."""
    return _run(["qemu-img", *args], check=check, cwd=cwd).stdout


def qemu_io(path: str | Path, *cmds: str, fmt: str = "qcow2") -> str:
    argv: list[str | Path] = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    argv.append(path)
    return _run(argv).stdout


def qemu_img_check(path: str | Path, fmt: str = "qcow2") -> dict[str, Any]:
    """qemu-img check --output=json (any exit status); the parsed report."""
    result = _run(["qemu-img", "check", "-f", fmt, "--output=json", path], check=False)
    try:
        doc: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"qemu-img check failed: {result.stdout}\n{result.stderr}") from None
    doc["exit"] = result.returncode
    return doc


def assert_clean(path: str | Path) -> None:
    doc = qemu_img_check(path)
    assert doc["exit"] == 0, doc
    assert doc.get("corruptions", 0) == 0, doc
    assert doc.get("leaks", 0) == 0, doc


def to_raw(path: str | Path, out: str | Path, fmt: str | None = None) -> bytes:
    args: list[str | Path] = ["convert", "-O", "raw"]
    if fmt:
        args += ["-f", fmt]
    qemu_img(*args, path, out)
    return Path(out).read_bytes()


def qemu_img_map(path: str | Path) -> list[tuple[int, int, int, bool, bool, bool]]:
    return normalize_map(json.loads(qemu_img("map", "--output=json", path)))


def normalize_map(
    entries: Iterable[dict[str, Any]],
) -> list[tuple[int, int, int, bool, bool, bool]]:
    """(start, length, depth, present, zero, data), merging neighbours with equal flags.

    Host offsets are dropped: they differ between writers by design.
    """
    out: list[tuple[int, int, int, bool, bool, bool]] = []
    for e in entries:
        key = (int(e["depth"]), bool(e["present"]), bool(e["zero"]), bool(e["data"]))
        start, length = int(e["start"]), int(e["length"])
        if out and out[-1][2:] == key and out[-1][0] + out[-1][1] == start:
            last = out[-1]
            out[-1] = (last[0], last[1] + length, *key)
        else:
            out.append((start, length, *key))
    return out


def expected_nbd_maps(
    qmap: list[tuple[int, int, int, bool, bool, bool]],
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """What nbdinfo --map (base:allocation) and qemu:allocation-depth should say.

    base:allocation flags: 1 = hole (no data), 2 = zero.  allocation-depth:
    0 unallocated, else qemu-img map's 0-based depth + 1.
    """
    alloc = _merge((s, n, (0 if d else 1) | (2 if z else 0)) for s, n, _dep, _p, z, d in qmap)
    depth = _merge((s, n, dep + 1 if p else 0) for s, n, dep, p, _z, _d in qmap)
    return alloc, depth


def _merge(items: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for s, n, v in items:
        if out and out[-1][2] == v and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n, v)
        else:
            out.append((s, n, v))
    return out


def chain_map_from_nbdinfo(text: str) -> list[tuple[int, int, int]]:
    """Parse ``nbdinfo --map --json`` output into merged (start, length, value)."""
    doc = json.loads(text)
    return _merge((int(e["offset"]), int(e["length"]), int(e["type"])) for e in doc)


async def read_driver(path: str | Path, fmt: str | None = None) -> bytes:
    """The whole guest-visible content through nbdserve's own chain."""
    from nbdserve.block.chain import ChainOptions, open_chain
    from nbdserve.block.device import BlockDevice

    chain = await open_chain(str(path), ChainOptions(fmt=fmt, read_only=True))
    try:
        dev = BlockDevice(chain.top, read_only=True)
        buf = bytearray(dev.size)
        view = memoryview(buf)
        step = 4 * 1024 * 1024
        for pos in range(0, dev.size, step):
            n = min(step, dev.size - pos)
            await dev.readinto(pos, view[pos : pos + n])
        return bytes(buf)
    finally:
        await chain.aclose()


def direct_io_supported(directory: Path) -> bool:
    """Whether files in ``directory`` can be opened with O_DIRECT (tmpfs cannot)."""
    try:
        fd = os.open(directory / "probe", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True
