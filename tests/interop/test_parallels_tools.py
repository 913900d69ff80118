"""Parallels through the CLI, judged by qemu-img: a bad data_off, img map, preallocation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nbdserve.errors import InvalidImageError
from tests.conftest import require_tools
from tests.helpers.server import free_port, run, server_process
from tests.unit.block.parallels.images import header_fields, open_driver, patch_header

pytestmark = pytest.mark.interop

KIB = 1024
MIB = 1 << 20


async def nbdserve(*args: str | Path, check: bool = True) -> str:
    return await run(sys.executable, "-m", "nbdserve", *args, check=check)


async def qemu_image(path: Path, size: int, cluster_size: int, *writes: str) -> Path:
    opts = f"cluster_size={cluster_size}"
    await run("qemu-img", "create", "-q", "-f", "parallels", "-o", opts, path, str(size))
    if writes:
        await run("qemu-io", "-f", "parallels", *[a for w in writes for a in ("-c", w)], path)
    return path


async def test_bad_data_off_refused_reported_and_repaired(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    img = await qemu_image(tmp_path / "d.img", 8 * MIB, 64 * KIB, "write -P 0x5a 0 200k")
    (tmp_path / "expect.raw").write_bytes(b"\x5a" * 200 * KIB + bytes(8 * MIB - 200 * KIB))
    good = header_fields(img)["data_off"]
    patch_header(img, data_off=good + 10_000)  # past the end of the file
    with pytest.raises(InvalidImageError, match="invalid data_off"):
        await open_driver(img)
    out = await nbdserve("img", "check", img, check=False)
    assert "data_off" in out
    await nbdserve("img", "check", "--repair", "all", img)
    assert header_fields(img)["data_off"] == good
    await run("qemu-img", "check", "-f", "parallels", img)  # exit 0: clean
    out = await run(
        "qemu-img", "compare", "-f", "parallels", "-F", "raw", img, tmp_path / "expect.raw"
    )
    assert "identical" in out
    drv = await open_driver(img)  # read-write again
    await drv.aclose()


def runs(entries: list[dict[str, object]]) -> list[tuple[int, int, bool, bool]]:
    """(start, length, data, zero), neighbours merged: the two tools split differently."""
    out: list[tuple[int, int, bool, bool]] = []
    for e in entries:
        start, length = int(str(e["start"])), int(str(e["length"]))
        data, zero = bool(e["data"]), bool(e["zero"])
        if out and out[-1][2:] == (data, zero) and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, data, zero)
        else:
            out.append((start, length, data, zero))
    return out


@pytest.mark.parametrize("cluster_size", [4 * KIB, MIB])
async def test_img_map_matches_qemu_img_map(tmp_path: Path, cluster_size: int) -> None:
    require_tools("qemu-img", "qemu-io")
    img = await qemu_image(
        tmp_path / "m.img", 16 * MIB, cluster_size,
        "write -P 1 0 5k", "write -P 2 3M 1M", "write -z 6M 2M", "write -P 3 10000000 70000",
        "write -P 4 15M 1M",
    )  # fmt: skip
    theirs = json.loads(await run("qemu-img", "map", "-f", "parallels", "--output=json", img))
    ours = json.loads(await nbdserve("img", "map", "-f", "parallels", "--output", "json", img))
    assert any(e["data"] for e in ours)
    assert runs(ours) == runs(theirs)


async def served_file_size(img: Path, offset: int, *extra: str) -> int:
    """Serve ``img`` (serve CLI), write into an absent cluster, return the size while open."""
    port = free_port()
    argv = ["serve", "--bind", "127.0.0.1", "--port", str(port), *extra]
    with server_process(argv, port=port):
        await run("qemu-io", "-f", "raw", "-c", f"write -P 9 {offset} 4k", "-c", "flush",
                  f"nbd://127.0.0.1:{port}/p")  # fmt: skip
        return img.stat().st_size


async def test_prealloc_size_default_and_from_the_config_file(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    img = await qemu_image(tmp_path / "p.img", 64 * MIB, 64 * KIB)
    data_start = img.stat().st_size  # qemu-img's new image ends where data starts
    config = tmp_path / "server.toml"

    def write_config(settings: str) -> None:
        config.write_text(
            f'[[export]]\nname = "p"\npath = "{img}"\nformat = "parallels"\n{settings}'
        )

    write_config("")
    # default: 128 MiB ahead of the first allocated cluster (falloc)
    assert await served_file_size(img, 0, "--config", str(config)) == (
        data_start + 64 * KIB + 128 * MIB
    )
    assert img.stat().st_size == data_start + 64 * KIB  # trimmed on graceful close
    write_config("[export.settings]\nprealloc_size = 4194304\n")
    assert await served_file_size(img, MIB, "--config", str(config)) == (
        data_start + 2 * 64 * KIB + 4 * MIB
    )
