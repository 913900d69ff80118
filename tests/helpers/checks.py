"""Image consistency checks for tests: ``qemu-img check`` and ``nbdserve img check``.

Both speak qemu-img's exit statuses (0 clean, 2 corruptions, 3 leaks only,
1 check failed) and JSON report.  ``check_and_repair`` is the recovery a
crashed image gets: leaks may be repaired, corruption may not exist.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

# formats whose oracle is qemu-img; the others are checked by nbdserve itself
QEMU_CHECKED = ("qcow2", "parallels")


@dataclass
class CheckResult:
    status: int
    report: dict[str, Any]
    stderr: str

    @property
    def corruptions(self) -> int:
        return int(self.report.get("corruptions", 0))

    @property
    def leaks(self) -> int:
        return int(self.report.get("leaks", 0))


async def _run_check(argv: list[str]) -> CheckResult:
    with trio.fail_after(120):
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    try:
        report = json.loads(result.stdout or b"{}")
    except json.JSONDecodeError:
        report = {"unparsed": result.stdout.decode(errors="replace")}
    return CheckResult(result.returncode, report, result.stderr.decode(errors="replace"))


async def qemu_img_check(path: Path | str, fmt: str, repair: str | None = None) -> CheckResult:
    argv = ["qemu-img", "check", "-f", fmt, "--output=json"]
    if repair:
        argv += ["-r", repair]
    return await _run_check([*argv, str(path)])


async def nbdserve_img_check(path: Path | str, fmt: str, repair: str | None = None) -> CheckResult:
    argv = [sys.executable, "-m", "nbdserve", "img", "check", "-f", fmt, "--output", "json"]
    if repair:
        argv += ["--repair", repair]
    return await _run_check([*argv, str(path)])


async def image_check(path: Path | str, fmt: str, repair: str | None = None) -> CheckResult:
    """The format's oracle: qemu-img where QEMU knows the format, else nbdserve."""
    if fmt in QEMU_CHECKED:
        return await qemu_img_check(path, fmt, repair)
    return await nbdserve_img_check(path, fmt, repair)


async def assert_clean(path: Path | str, fmt: str) -> CheckResult:
    result = await image_check(path, fmt)
    assert result.status == 0, f"{fmt} check of {path}: {result}"
    assert result.corruptions == 0, result
    assert result.leaks == 0, result
    return result
