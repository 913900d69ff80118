"""`nbdserve img convert` between formats, judged by qemu-img compare and check."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from nbdserve.img import convert_image
from nbdserve.progress import Progress
from tests.conftest import require_tools
from tests.helpers.server import run

MiB = 1024 * 1024


@pytest.mark.parametrize("target_fmt", ["raw", "qcow2", "parallels", "fvd"])
async def test_convert_from_a_qcow2_chain(tmp_path: Path, target_fmt: str) -> None:
    require_tools("qemu-img", "qemu-io")
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    await run("qemu-img", "create", "-f", "qcow2", base, "32M")
    await run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 2M", "-c", "write -P 2 20M 1M", base)
    await run("qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    await run("qemu-io", "-f", "qcow2", "-c", "write -P 3 1M 2M", "-c", "write -z 20M 512k", top)
    out = tmp_path / f"out.{target_fmt}"
    await convert_image(str(top), None, str(out), target_fmt, {})
    if target_fmt == "fvd":
        raw = tmp_path / "fvd.raw"
        await convert_image(str(out), "fvd", str(raw), "raw", {})
        await run("qemu-img", "compare", "-F", "raw", top, raw)
    else:
        await run("qemu-img", "compare", "-F", target_fmt, top, out)
    if target_fmt in ("qcow2", "parallels"):
        await run("qemu-img", "check", "-f", target_fmt, out)
    if target_fmt == "raw":
        # zeros and unallocated ranges stay holes in the copy
        assert os.stat(out).st_blocks * 512 < 8 * MiB


def test_progress_draws_on_a_terminal_only() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    with Progress(100, "copy", tty) as bar:
        bar.advance(50)
    assert "100.0%" in tty.getvalue()
    assert tty.getvalue().endswith("\n")
    pipe = io.StringIO()
    with Progress(100, "copy", pipe) as bar:
        bar.advance(100)
    assert pipe.getvalue() == ""
