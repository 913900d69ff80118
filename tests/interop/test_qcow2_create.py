"""Images made by ``create_image`` satisfy qemu-img check/info/map and qemu-io."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nbdserve.block.qcow2 import create_image
from nbdserve.img import image_info
from tests.conftest import require_tools
from tests.helpers.images import assert_clean, qemu_img, qemu_img_map, qemu_io, read_driver

pytestmark = pytest.mark.interop

OPTIONS = [
    {},
    {"cluster_size": "512"},
    {"cluster_size": "2M"},
    {"compat": "0.10"},
    {"extended_l2": "on"},
    {"compression_type": "zstd"},
    {"refcount_bits": "1"},
    {"refcount_bits": "64", "cluster_size": "4K"},
    {"lazy_refcounts": "on"},
    {"preallocation": "metadata"},
    {"preallocation": "metadata", "extended_l2": "on"},
    {"data_file": "img.data"},
    {"data_file": "img.data", "data_file_raw": "on"},
]


def _ids(opts: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in opts.items())


@pytest.mark.parametrize("opts", OPTIONS, ids=_ids)
async def test_created_images_satisfy_qemu(tmp_path: Path, opts: dict[str, str]) -> None:
    require_tools("qemu-img", "qemu-io")
    path = tmp_path / "img.qcow2"
    if "data_file" in opts:  # qemu 7.2 resolves relative data files against its cwd
        opts = {**opts, "data_file": str(tmp_path / opts["data_file"])}
    await create_image(str(path), 8 << 20, dict(opts))
    assert_clean(path)
    theirs = json.loads(qemu_img("info", "--output=json", path))
    ours = (await image_info(str(path)))[0]
    assert ours["format-specific"] == theirs["format-specific"]
    assert ours["cluster-size"] == theirs["cluster-size"]
    qemu_io(path, "write -P 0x5a 100k 300k", "write -z 1m 64k")
    assert_clean(path)
    content = await read_driver(path)
    assert content[100 * 1024 : 400 * 1024] == b"\x5a" * (300 * 1024)
    assert content.count(0) == len(content) - 300 * 1024


async def test_backing_file_and_format_are_recorded(tmp_path: Path) -> None:
    require_tools("qemu-img")
    base = tmp_path / "base.qcow2"
    await create_image(str(base), 8 << 20, {})
    top = tmp_path / "top.qcow2"
    await create_image(str(top), 8 << 20, {"cluster_size": "512"}, "base.qcow2", "qcow2")
    info = json.loads(qemu_img("info", "--output=json", top))
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert_clean(top)


PREALLOC_CASES = [
    {"preallocation": "metadata"},
    {"preallocation": "metadata", "extended_l2": "on"},
    # a raw data file implies preallocation=metadata
    {"data_file": "img.data", "data_file_raw": "on", "extended_l2": "on"},
]


@pytest.mark.parametrize("opts", PREALLOC_CASES, ids=_ids)
async def test_preallocated_map_matches_qemu(tmp_path: Path, opts: dict[str, str]) -> None:
    require_tools("qemu-img")
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    ours_dir.mkdir()
    theirs_dir.mkdir()
    ours, theirs = ours_dir / "img.qcow2", theirs_dir / "img.qcow2"
    # qemu 7.2 resolves a relative data file against its cwd: name them absolutely
    if "data_file" in opts:
        await create_image(str(ours), 8 << 20, {**opts, "data_file": str(ours_dir / "img.data")})
        opts = {**opts, "data_file": str(theirs_dir / "img.data")}
    else:
        await create_image(str(ours), 8 << 20, dict(opts))
    qemu_img("create", "-q", "-f", "qcow2", "-o", _o(opts), theirs, "8M")
    assert qemu_img_map(ours) == qemu_img_map(theirs)
    assert_clean(ours)


def _o(opts: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in opts.items())


def _nbdserve_img(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdserve", "img", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )


@pytest.mark.parametrize("cluster_size", ["64K", "32K"])
def test_preallocation_over_a_backing_file_shows_the_backing(
    tmp_path: Path, cluster_size: str
) -> None:
    """With extended L2 entries QEMU allows it and leaves every subcluster unallocated."""
    require_tools("qemu-img", "qemu-io")
    base = tmp_path / "base.raw"
    qemu_img("create", "-q", "-f", "raw", base, "4M")
    qemu_io(base, "write -P 0x5b 0 3M", fmt="raw")
    opts = f"preallocation=metadata,extended_l2=on,cluster_size={cluster_size}"
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    made = _nbdserve_img(
        "create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.raw", "-F", "raw", ours,
        cwd=tmp_path,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.raw", "-F", "raw", theirs)
    assert qemu_img_map(ours) == qemu_img_map(theirs)
    assert "identical" in qemu_img("compare", ours, base).lower()
    assert_clean(ours)
    # a partial write allocates only the subclusters it touches; the rest still shows base
    qemu_io(ours, "write -P 0x11 100k 4k")
    qemu_io(theirs, "write -P 0x11 100k 4k")
    assert "identical" in qemu_img("compare", ours, theirs).lower()
    assert qemu_img_map(ours) == qemu_img_map(theirs)
    assert_clean(ours)


@pytest.mark.parametrize(
    "opts",
    [
        "preallocation=metadata",
        "data_file=img.data,data_file_raw=on",
        "data_file=img.data,data_file_raw=on,extended_l2=on",
    ],
)
def test_backing_file_refused_where_qemu_refuses(tmp_path: Path, opts: str) -> None:
    require_tools("qemu-img")
    qemu_img("create", "-q", "-f", "raw", tmp_path / "base.raw", "4M")
    argv = ("create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.raw", "-F", "raw")
    theirs = subprocess.run(
        ["qemu-img", *argv, "theirs.qcow2"], capture_output=True, text=True, cwd=tmp_path
    )
    assert theirs.returncode != 0
    ours = _nbdserve_img(*argv, "ours.qcow2", cwd=tmp_path)
    assert ours.returncode != 0
    # the same reason as QEMU's, after its "qemu-img: FILE: " prefix
    reason = theirs.stderr.strip().rsplit(": ", 1)[-1]
    assert reason in ours.stderr, (theirs.stderr, ours.stderr)
    assert not (tmp_path / "ours.qcow2").exists()
