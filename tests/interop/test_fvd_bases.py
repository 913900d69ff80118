"""An FVD overlay over a qcow2, parallels or FVD base, read and written through NBD.

qemu-io writes the base (qcow2 and parallels directly; an FVD base through an
nbdserve export, since no other tool reads FVD) and the overlay; the same
writes applied to a bytearray give the expected disk, and ``qemu-img compare``
of the served overlay against it is the oracle.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nbdserve.block.fvd import FvdDriver
from tests.conftest import require_tools
from tests.helpers.server import export, run, running_server, uri

pytestmark = pytest.mark.interop

KIB = 1024
MIB = 1024 * 1024
SIZE = 4 * MIB

# (offset, length, pattern): unaligned to the 64 KiB FVD blocks on purpose, so
# overlay writes copy the rest of their block from the base
BASE_WRITES = [(0, 192 * KIB, 0x11), (MIB + 4 * KIB, 300 * KIB, 0x22), (3 * MIB, MIB, 0x33)]
OVERLAY_WRITES = [
    (96 * KIB, 8 * KIB, 0xA1),
    (MIB, 512, 0xA2),
    (3 * MIB + 200 * KIB, 700 * KIB, 0xA3),
]


async def nbdserve(*args: str | Path) -> str:
    return await run(sys.executable, "-m", "nbdserve", *args)


def qemu_io_writes(writes: list[tuple[int, int, int]]) -> list[str]:
    return [a for off, n, pat in writes for a in ("-c", f"write -P {pat} {off} {n}")]


def apply(disk: bytearray, writes: list[tuple[int, int, int]]) -> None:
    for off, n, pat in writes:
        disk[off : off + n] = bytes([pat]) * n


async def make_base(tmp_path: Path, fmt: str) -> Path:
    base = tmp_path / f"base.{fmt}"
    if fmt == "fvd":
        await nbdserve("img", "create", "-q", "-f", "fvd", base, str(SIZE))
        async with running_server(export(base, "base")) as srv:
            await run("qemu-io", "-f", "raw", *qemu_io_writes(BASE_WRITES), uri(srv, "base"))
    else:
        await run("qemu-img", "create", "-q", "-f", fmt, base, str(SIZE))
        await run("qemu-io", "-f", fmt, *qemu_io_writes(BASE_WRITES), base)
    return base


async def compare_served(image: Path, expect: Path, *, read_only: bool) -> None:
    async with running_server(export(image, "img", read_only=read_only)) as srv:
        out = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", expect, uri(srv, "img"))
    assert "identical" in out


@pytest.mark.parametrize("copy_on_read", ["on", "off"])
@pytest.mark.parametrize("base_fmt", ["qcow2", "parallels", "fvd"])
async def test_fvd_over_a_base_of_each_format(
    tmp_path: Path, base_fmt: str, copy_on_read: str
) -> None:
    require_tools("qemu-img", "qemu-io")
    base = await make_base(tmp_path, base_fmt)
    expect = bytearray(SIZE)
    apply(expect, BASE_WRITES)
    (tmp_path / "base.expect").write_bytes(expect)
    image = tmp_path / "img.fvd"
    await nbdserve(
        "img", "create", "-q", "-f", "fvd", "-b", base.name, "-F", base_fmt,
        "-o", f"copy_on_read={copy_on_read}", image,
    )  # fmt: skip
    # the untouched overlay reads as its base
    await compare_served(image, tmp_path / "base.expect", read_only=True)
    async with running_server(export(image, "img")) as srv:
        target = uri(srv, "img")
        # read everything first: with copy-on-read this fills the image from the base
        await run("qemu-img", "compare", "-f", "raw", "-F", "raw", tmp_path / "base.expect", target)
        assert srv.registry is not None
        top = next(iter(srv.registry)).chain.top
        assert isinstance(top, FvdDriver)
        copied = top.statistics().extra["cor_bytes"]
        assert copied > 0 if copy_on_read == "on" else copied == 0
        await run("qemu-io", "-f", "raw", *qemu_io_writes(OVERLAY_WRITES), target)
        apply(expect, OVERLAY_WRITES)
        (tmp_path / "expect.raw").write_bytes(expect)
        out = await run(
            "qemu-img", "compare", "-f", "raw", "-F", "raw", tmp_path / "expect.raw", target
        )
        assert "identical" in out
    assert "No errors" in await nbdserve("img", "check", image)
    # after the graceful close, from disk
    await compare_served(image, tmp_path / "expect.raw", read_only=True)
