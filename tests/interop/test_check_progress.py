"""`img check` progress bars: they move through the walk on a terminal, and stay
silent anywhere else.

Entering and leaving a bar always draws 0% and 100%, so only a percentage
strictly between them shows that the check reported while it walked.  Each
image is big enough for its walk to take several steps: qcow2 16 L2 tables,
parallels a 16 MiB BAT, FVD a 16 MiB table (metadata is read 4 MiB at a time).
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
import trio

from nbdserve.block import formats
from nbdserve.progress import Progress, reporting
from tests.conftest import require_tools
from tests.helpers.server import run

pytestmark = pytest.mark.interop

_PERCENT = re.compile(r"\[[#-]+\]\s+(\d+\.\d)%")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


async def _qcow2(tmp_path: Path) -> Path:
    require_tools("qemu-img", "qemu-io")
    img = tmp_path / "c.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "64M")
    # 4k clusters: one L2 table maps 2 MiB, so 32 MiB written is 16 tables to walk
    await run("qemu-io", "-f", "qcow2", "-c", "write 0 32M", img)
    return img


async def _parallels(tmp_path: Path) -> Path:
    require_tools("qemu-img", "qemu-io")
    img = tmp_path / "c.parallels"
    # 4 bytes per 4k cluster of 16 GiB: a 16 MiB BAT, which qemu-img writes out
    await run("qemu-img", "create", "-q", "-f", "parallels", "-o", "cluster_size=4k", img, "16G")
    await run("qemu-io", "-f", "parallels", "-c", "write 0 1M", "-c", "write 12G 1M", img)
    return img


async def _fvd(tmp_path: Path) -> Path:
    img = tmp_path / "c.fvd"
    # 4 bytes per 4k chunk of 16 GiB: a 16 MiB table, read through on every load
    await run(
        sys.executable, "-m", "nbdserve", "img", "create", "-q", "-f", "fvd",
        "-o", "compact=on,block_size=4k,chunk_size=4k,journal_size=64k",
        img, "16G",
    )  # fmt: skip
    return img


MAKERS = {"qcow2": _qcow2, "parallels": _parallels, "fvd": _fvd}


def _check(fmt: str, img: Path, stream: io.StringIO) -> int:
    """Run the format's check under a bar drawing every report (no rate limit)."""
    check = formats.load(fmt).check_image  # type: ignore[attr-defined]
    with reporting(Progress(1000, "checking", stream, interval=0)):
        report = trio.run(check, str(img), None)
    return int(report.exit_status())


@pytest.mark.parametrize("fmt", sorted(MAKERS))
def test_check_reports_progress_on_a_terminal(tmp_path: Path, fmt: str) -> None:
    img = trio.run(MAKERS[fmt], tmp_path)
    tty = Tty()
    assert _check(fmt, img, tty) == 0
    drawn = tty.getvalue()
    percents = [float(p) for p in _PERCENT.findall(drawn)]
    print(f"{fmt}: drawn {percents}")
    assert percents[0] == 0.0
    assert percents[-1] == 100.0
    between = [p for p in percents if 0.0 < p < 100.0]
    assert len(between) >= 2, f"no progress while walking: {percents}"
    assert percents == sorted(percents), "the bar went backwards"
    assert drawn.endswith("\n")


@pytest.mark.parametrize("fmt", sorted(MAKERS))
def test_check_draws_nothing_when_not_a_terminal(tmp_path: Path, fmt: str) -> None:
    img = trio.run(MAKERS[fmt], tmp_path)
    pipe = io.StringIO()
    assert _check(fmt, img, pipe) == 0
    assert pipe.getvalue() == ""


async def test_cli_check_progress_is_silent_on_a_pipe(tmp_path: Path) -> None:
    """``img check -p`` with stderr on a pipe (a script, a log): no bar at all."""
    img = await _parallels(tmp_path)
    result = await trio.run_process(
        [sys.executable, "-m", "nbdserve", "img", "check", "-p", str(img)],
        capture_stdout=True,
        capture_stderr=True,
    )
    assert result.returncode == 0
    assert b"checking" not in result.stderr
    assert b"\r" not in result.stderr
    assert b"No errors were found" in result.stdout
