"""``nbdserve img create`` / ``img info`` for qcow2 through the real command line
(``python -m nbdserve img ...`` in a child process), judged by qemu-img."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tools
from tests.helpers.images import assert_clean, qemu_img, qemu_img_check, qemu_io

pytestmark = pytest.mark.interop

MiB = 1 << 20


def nbdserve_img(*args: str | Path, cwd: Path) -> str:
    """``python -m nbdserve img ARGS`` in ``cwd``; its stdout (it must succeed)."""
    result = subprocess.run(
        [sys.executable, "-m", "nbdserve", "img", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def qemu_info(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(qemu_img("info", "--output=json", path))
    return doc


def _base(tmp_path: Path, fmt: str) -> Path:
    base = tmp_path / f"base.{fmt}"
    qemu_img("create", "-q", "-f", fmt, base, "8M")
    qemu_io(base, "write -P 0x42 0 3M", fmt=fmt)
    return base


@pytest.mark.parametrize(
    ("base_fmt", "cluster_size", "refcount_bits"), [("raw", 65536, 16), ("qcow2", 16384, 64)]
)
def test_img_create_qcow2_with_every_option(
    tmp_path: Path, base_fmt: str, cluster_size: int, refcount_bits: int
) -> None:
    require_tools("qemu-img", "qemu-io")
    base = _base(tmp_path, base_fmt)
    opts = (
        f"cluster_size={cluster_size},extended_l2=on,compression_type=zstd,"
        f"refcount_bits={refcount_bits},lazy_refcounts=on"
    )
    out = nbdserve_img(
        "create", "-f", "qcow2", "-o", opts, "-b", base.name, "-F", base_fmt, "top.qcow2", "24M",
        cwd=tmp_path,
    )  # fmt: skip
    assert "Formatting 'top.qcow2', fmt=qcow2 size=25165824" in out, out
    top = tmp_path / "top.qcow2"
    info = qemu_info(top)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 24 * MiB
    assert info["cluster-size"] == cluster_size
    assert info["backing-filename"] == base.name
    assert info["backing-filename-format"] == base_fmt
    data = info["format-specific"]["data"]
    assert data["compat"] == "1.1"
    assert data["compression-type"] == "zstd"
    assert data["extended-l2"] is True
    assert data["lazy-refcounts"] is True
    assert data["refcount-bits"] == refcount_bits
    assert data["corrupt"] is False
    check = qemu_img_check(top)
    assert check["exit"] == 0, check
    assert check.get("check-errors", 0) == 0, check
    # the backing file shows through (the rest reads as zeros), and qemu can write it
    qemu_img("compare", "-f", base_fmt, "-F", "qcow2", base, top)
    qemu_io(top, "write -P 0x17 1M 100k", "write -c 8M 1M")
    assert_clean(top)
    assert qemu_io(top, "read -P 0x42 0 1M", "read -P 0x17 1M 100k").count("read ") == 2


def test_img_create_takes_the_size_of_the_backing_file(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    _base(tmp_path, "qcow2")
    nbdserve_img(
        "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-o", "compression_type=zstd",
        "-b", "base.qcow2", "-F", "qcow2", "top.qcow2",
        cwd=tmp_path,
    )  # fmt: skip
    info = qemu_info(tmp_path / "top.qcow2")
    assert info["virtual-size"] == 8 * MiB
    assert info["cluster-size"] == 4096  # both -o options count
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    assert info["backing-filename"] == "base.qcow2"
    assert_clean(tmp_path / "top.qcow2")


def _qemu_made_overlay(tmp_path: Path) -> Path:
    _base(tmp_path, "raw")
    top = tmp_path / "top.qcow2"
    opts = "cluster_size=32768,extended_l2=on,compression_type=zstd,lazy_refcounts=on"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.raw", "-F", "raw", top, "16M")
    qemu_io(top, "write -P 0x33 2M 1M")
    return top


def test_img_info_json_matches_qemu_img(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    top = _qemu_made_overlay(tmp_path)
    ours = json.loads(nbdserve_img("info", "--output", "json", top, cwd=tmp_path))
    theirs = qemu_info(top)
    for key in (
        "format",
        "virtual-size",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
        "format-specific",
    ):
        assert ours[key] == theirs[key], key
    assert ours["virtual-size"] == 16 * MiB
    chain = json.loads(
        nbdserve_img("info", "--output", "json", "--backing-chain", top, cwd=tmp_path)
    )
    assert [layer["format"] for layer in chain] == ["qcow2", "raw"]
    assert chain[1]["virtual-size"] == 8 * MiB


def test_img_info_human(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    top = _qemu_made_overlay(tmp_path)
    lines = nbdserve_img("info", top, cwd=tmp_path).splitlines()
    assert f"image: {top}" in lines
    assert "file format: qcow2" in lines
    assert "virtual size: 16 MiB (16777216 bytes)" in lines
    assert "cluster_size: 32768" in lines
    assert "backing file: base.raw" in lines
    assert "backing file format: raw" in lines
    assert "Format specific information:" in lines
    assert "    compression-type: zstd" in lines
    assert "    extended-l2: true" in lines
    assert "    lazy-refcounts: true" in lines
