"""Images made by ``create_image`` satisfy qemu-img check/info/map and qemu-io."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
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


async def test_preallocated_map_matches_qemu(tmp_path: Path) -> None:
    require_tools("qemu-img")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    await create_image(str(ours), 8 << 20, {"preallocation": "metadata"})
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", theirs, "8M")
    assert qemu_img_map(ours) == qemu_img_map(theirs)
