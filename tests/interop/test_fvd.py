"""FVD through real clients: the img CLI, qemu-img/qemu-io over nbdserve, an NBD base."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import trio

from nbdserve.block.fvd import FvdDriver
from tests.conftest import require_tools
from tests.helpers.server import export, run, running_server, unix_uri, uri

pytestmark = pytest.mark.interop

KIB = 1024
MIB = 1024 * 1024


async def nbdserve(*args: str | Path, check: bool = True) -> str:
    return await run(sys.executable, "-m", "nbdserve", *args, check=check)


def make_base(path: Path, size: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    data = bytearray(size)
    for lo in range(0, size, 256 * KIB):  # half data, half holes
        if rng.random() < 0.5:
            data[lo : lo + 256 * KIB] = rng.randbytes(min(256 * KIB, size - lo))
    path.write_bytes(data)
    return bytes(data)


async def test_img_create_info_check_map(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", 4 * MIB)
    await nbdserve(
        "img", "create", "-f", "fvd", "-b", "base.raw", "-F", "raw",
        "-o", "compact=on,block_size=4k,chunk_size=64k,journal_size=64k,copy_on_read=off",
        "-o", "prefetch_start_delay=5,num_prefetch_slots=3,bytes_per_prefetch=128k",
        tmp_path / "img.fvd",
    )  # fmt: skip
    info = json.loads(await nbdserve("img", "info", "--output", "json", tmp_path / "img.fvd"))
    assert info["format"] == "fvd"
    assert info["virtual-size"] == 4 * MIB  # from the base
    assert info["backing-filename"] == "base.raw"
    data = info["format-specific"]["data"]
    assert data["compact"] is True
    assert data["block-size"] == 4096
    assert data["chunk-size"] == 65536
    assert data["prefetch-bytes-copied"] == 0
    assert data["prefetch-bytes-total"] == 4 * MIB
    assert data["base-img-fully-prefetched"] is False
    assert data["prefetch-start-delay"] == 5
    human = await nbdserve("img", "info", tmp_path / "img.fvd")
    assert "prefetch-progress: 0.0%" in human
    assert "Image check" not in await nbdserve("img", "check", tmp_path / "img.fvd")
    entries = json.loads(await nbdserve("img", "map", "--output", "json", tmp_path / "img.fvd"))
    assert entries[0]["start"] == 0
    assert sum(e["length"] for e in entries) == 4 * MIB
    assert all(e["depth"] == 1 for e in entries)  # everything still comes from the base


async def test_img_create_detect_zero_blocks(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.raw", 4 * MIB)
    await nbdserve(
        "img", "create", "-q", "-f", "fvd", "-b", "base.raw", "-F", "raw",
        "-o", "detect_zero_blocks=on,block_size=64k", tmp_path / "img.fvd", "6M",
    )  # fmt: skip
    info = json.loads(await nbdserve("img", "info", "--output", "json", tmp_path / "img.fvd"))
    data = info["format-specific"]["data"]
    assert data["need-zero-init"] is True
    zero_blocks = sum(
        1 for i in range(0, 4 * MIB, 64 * KIB) if base[i : i + 64 * KIB] == bytes(64 * KIB)
    )
    assert zero_blocks > 0
    assert data["prefetch-bytes-copied"] == zero_blocks * 64 * KIB
    assert info["virtual-size"] == 6 * MIB


async def test_served_fvd_matches_qemu_img_compare(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    base = make_base(tmp_path / "base.raw", 4 * MIB)
    expect = bytearray(base) + bytearray(2 * MIB)
    await nbdserve(
        "img", "create", "-q", "-f", "fvd", "-b", "base.raw", "-F", "raw",
        "-o", "block_size=64k,compact=on,data_file=img.data", tmp_path / "img.fvd", "6M",
    )  # fmt: skip
    async with running_server(export(tmp_path / "img.fvd", "img")) as srv:
        target = uri(srv, "img")
        cmds = []
        rng = random.Random(9)
        for _ in range(30):
            off = rng.randrange(0, 6 * MIB // 512 - 200) * 512
            n = rng.randrange(1, 200) * 512
            pattern = rng.randrange(1, 255)
            cmds += ["-c", f"write -P {pattern} {off} {n}"]
            expect[off : off + n] = bytes([pattern]) * n
        await run("qemu-io", "-f", "raw", *cmds, target)
        (tmp_path / "expect.raw").write_bytes(expect)
        out = await run(
            "qemu-img", "compare", "-f", "raw", "-F", "raw", tmp_path / "expect.raw", target
        )
        assert "identical" in out
    assert "No errors" in await nbdserve("img", "check", tmp_path / "img.fvd")
    # the closed image (bitmap, table and data file as the graceful close left
    # them, journal zeroed) must still hold every write: serve it again, read-only
    async with running_server(export(tmp_path / "img.fvd", "img", read_only=True)) as srv:
        target = uri(srv, "img")
        out = await run(
            "qemu-img", "compare", "-f", "raw", "-F", "raw", tmp_path / "expect.raw", target
        )
    assert "identical" in out


async def test_prefetch_from_an_nbd_base_then_the_base_can_go(tmp_path: Path) -> None:
    require_tools("qemu-img")
    base = make_base(tmp_path / "base.raw", 8 * MIB, seed=3)
    base_sock = tmp_path / "base.sock"
    async with running_server(
        export(tmp_path / "base.raw", "base", read_only=True), socket_path=base_sock, tcp=False
    ):
        await nbdserve(
            "img", "create", "-q", "-f", "fvd", "-b", unix_uri(base_sock, "base"),
            "-o", "block_size=64k,bytes_per_prefetch=512k,prefetch_start_delay=0",
            tmp_path / "img.fvd",
        )  # fmt: skip
        cfg = export(tmp_path / "img.fvd", "img", settings={"allow_nbd_backing": True})
        async with running_server(cfg) as srv:
            assert srv.registry is not None
            top = next(iter(srv.registry)).chain.top
            assert isinstance(top, FvdDriver)
            assert top.prefetcher is not None
            with trio.fail_after(60):
                await top.prefetcher.done.wait()
            assert top.prefetcher.state.value == "done"
            assert top.header.base_img_fully_prefetched == 1
            (tmp_path / "expect.raw").write_bytes(base)
            out = await run(
                "qemu-img",
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                tmp_path / "expect.raw",
                uri(srv, "img"),
            )
            assert "identical" in out
    # the base server is gone and the base file too: the image stands alone
    os.unlink(tmp_path / "base.raw")
    info = json.loads(await nbdserve("img", "info", "--output", "json", tmp_path / "img.fvd"))
    data = info["format-specific"]["data"]
    assert data["base-img-fully-prefetched"] is True
    assert data["prefetch-bytes-copied"] == data["prefetch-bytes-total"] == 8 * MIB
    assert "backing-filename" not in info
    async with running_server(export(tmp_path / "img.fvd", "img")) as srv:
        out = await run(
            "qemu-img",
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            tmp_path / "expect.raw",
            uri(srv, "img"),
        )
        assert "identical" in out
    assert "No errors" in await nbdserve("img", "check", tmp_path / "img.fvd")


async def test_nbd_base_refused_without_the_setting(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", MIB)
    sock = tmp_path / "base.sock"
    async with running_server(
        export(tmp_path / "base.raw", "base", read_only=True), socket_path=sock, tcp=False
    ):
        await nbdserve(
            "img", "create", "-q", "-f", "fvd", "-b", unix_uri(sock, "base"), tmp_path / "img.fvd"
        )
        from nbdserve.errors import ConfigError
        from nbdserve.server.exports import open_export

        with pytest.raises(ConfigError, match="allow_nbd_backing"):
            await open_export(export(tmp_path / "img.fvd", "img"))
    # img info names the NBD base without connecting to it (the server is gone)
    info = json.loads(await nbdserve("img", "info", "--output", "json", tmp_path / "img.fvd"))
    assert info["backing-filename"] == unix_uri(sock, "base")
    assert info["format-specific"]["data"]["prefetch-bytes-copied"] == 0
