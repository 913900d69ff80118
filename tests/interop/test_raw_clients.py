"""Real NBD clients against a served raw image (the foundation's interop tier)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tests.conftest import require_tools
from tests.helpers.server import export, nbdsh_argv, run, running_server, unix_uri, uri

MiB = 1024 * 1024


def _patterned(path: Path, size: int, *, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    data = bytearray(size)
    for _ in range(16):
        off = rng.randrange(0, size - 65536)
        data[off : off + 65536] = rng.randbytes(65536)
    path.write_bytes(data)
    return bytes(data)


async def test_qemu_img_compare(tmp_path: Path) -> None:
    require_tools("qemu-img")
    img = tmp_path / "disk.raw"
    _patterned(img, 8 * MiB)
    async with running_server(export(img, "disk")) as srv:
        await run("qemu-img", "compare", "-f", "raw", "-F", "raw", img, uri(srv, "disk"))
        # a differing byte must be noticed: the comparison can fail
        other = tmp_path / "other.raw"
        other.write_bytes(img.read_bytes()[:-1] + b"\x01")
        out = await run(
            "qemu-img", "compare", "-f", "raw", "-F", "raw", other, uri(srv, "disk"), check=False
        )
    assert "differ" in out.lower() or "mismatch" in out.lower()


async def test_qemu_io_writes_with_fua(tmp_path: Path) -> None:
    require_tools("qemu-io")
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(4 * MiB))
    async with running_server(export(img, "disk")) as srv:
        u = uri(srv, "disk")
        await run("qemu-io", "-f", "raw", "-c", "write -f -P 0xab 4096 65536", u)  # FUA
        await run("qemu-io", "-f", "raw", "-c", "write -P 0xcd 1048576 1000", u)
        out = await run("qemu-io", "-f", "raw", "-c", "read -P 0xab 4096 65536", u)
        assert "Pattern verification failed" not in out
        out = await run("qemu-io", "-f", "raw", "-c", "read -P 0xcd 1048576 1000", u)
        assert "Pattern verification failed" not in out
    data = img.read_bytes()
    assert data[4096 : 4096 + 65536] == b"\xab" * 65536
    assert data[MiB : MiB + 1000] == b"\xcd" * 1000
    assert data[:4096] == bytes(4096)


async def test_nbdinfo_json_flags_and_block_sizes(tmp_path: Path) -> None:
    require_tools("nbdinfo")
    rw = tmp_path / "rw.raw"
    ro = tmp_path / "ro.raw"
    rw.write_bytes(bytes(MiB))
    ro.write_bytes(bytes(MiB))
    async with running_server(export(rw, "rw"), export(ro, "ro", read_only=True, shared=1)) as srv:
        doc = json.loads(await run("nbdinfo", "--json", uri(srv, "rw")))
        info = doc["exports"][0]
        assert doc["structured"] is True
        assert info["export-size"] == MiB
        assert info["is_read_only"] is False
        for flag in (
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_fast_zero",
            "can_cache",
            "can_multi_conn",
            "can_df",
        ):
            assert info[flag] is True, flag
        assert info["block_size_minimum"] == 1
        assert info["block_size_preferred"] == 4096
        assert info["block_size_maximum"] == 32 * MiB
        assert set(info["contexts"]) >= {"base:allocation", "qemu:allocation-depth"}

        doc = json.loads(await run("nbdinfo", "--json", uri(srv, "ro")))
        info = doc["exports"][0]
        assert info["is_read_only"] is True
        for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
            assert info[flag] is False, flag


async def test_nbdinfo_list_shows_descriptions(tmp_path: Path) -> None:
    require_tools("nbdinfo")
    exports = []
    for i in range(3):
        img = tmp_path / f"d{i}.raw"
        img.write_bytes(bytes((i + 1) * MiB))
        exports.append(export(img, f"disk{i}", description=f"test disk number {i}"))
    async with running_server(*exports) as srv:
        doc = json.loads(await run("nbdinfo", "--list", "--json", uri(srv)))
    by_name = {e["export-name"]: e for e in doc["exports"]}
    assert set(by_name) == {"disk0", "disk1", "disk2"}
    for i in range(3):
        assert by_name[f"disk{i}"]["description"] == f"test disk number {i}"
        assert by_name[f"disk{i}"]["export-size"] == (i + 1) * MiB


async def test_nbdinfo_map_reports_holes(tmp_path: Path) -> None:
    require_tools("nbdinfo")
    img = tmp_path / "sparse.raw"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(4 * MiB)
        f.write(b"\x55" * MiB)
    async with running_server(export(img, "s")) as srv:
        doc = json.loads(await run("nbdinfo", "--map", "--json", uri(srv, "s")))
        depth = json.loads(
            await run("nbdinfo", "--map=qemu:allocation-depth", "--json", uri(srv, "s"))
        )
    ranges = [(e["offset"], e["length"], e["type"]) for e in doc]
    assert ranges == [
        (0, 4 * MiB, 3),  # hole + zero
        (4 * MiB, MiB, 0),  # data
        (5 * MiB, 11 * MiB, 3),
    ]
    # a raw file decides all of its content: depth 1 everywhere
    assert [(e["offset"], e["length"], e["type"]) for e in depth] == [(0, 16 * MiB, 1)]


async def test_nbdcopy_both_ways(tmp_path: Path) -> None:
    require_tools("nbdcopy")
    src = tmp_path / "src.raw"
    data = _patterned(src, 16 * MiB, seed=7)
    dst = tmp_path / "dst.raw"
    dst.write_bytes(bytes(16 * MiB))
    out = tmp_path / "out.raw"
    async with running_server(export(src, "src", read_only=True), export(dst, "dst")) as srv:
        await run("nbdcopy", uri(srv, "src"), str(out))
        await run("nbdcopy", str(src), uri(srv, "dst"))
    assert out.read_bytes() == data
    assert dst.read_bytes() == data


async def test_qemu_img_convert_through_unix_socket(tmp_path: Path) -> None:
    require_tools("qemu-img", "nbdinfo")
    img = tmp_path / "disk.raw"
    data = _patterned(img, 4 * MiB, seed=3)
    sock = tmp_path / "nbd.sock"
    async with running_server(export(img, "unixdisk"), socket_path=sock, tcp=False):
        out = tmp_path / "copy.raw"
        await run("qemu-img", "convert", "-f", "raw", "-O", "raw", unix_uri(sock, "unixdisk"), out)
        size = await run("nbdinfo", "--size", unix_uri(sock, "unixdisk"))
    assert out.read_bytes() == data
    assert int(size) == 4 * MiB


async def test_fio_randwrite_verify(tmp_path: Path) -> None:
    require_tools("fio")
    img = tmp_path / "fio.raw"
    img.write_bytes(bytes(32 * MiB))
    async with running_server(export(img, "fio")) as srv:
        out = await run(
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            f"--uri={uri(srv, 'fio')}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--randrepeat=1",
            "--output-format=json",
            timeout=180,
        )
    doc = json.loads(out[out.index("{") :])
    job = doc["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 32 * MiB
    assert job["read"]["io_bytes"] >= 32 * MiB  # the verify pass read everything back


@pytest.mark.parametrize("no_hole", [False, True])
async def test_write_zeroes_and_trim_through_nbdsh(tmp_path: Path, no_hole: bool) -> None:
    require_tools("nbdsh")
    img = tmp_path / "z.raw"
    img.write_bytes(b"\xff" * (4 * MiB))
    flags = "nbd.CMD_FLAG_NO_HOLE" if no_hole else "0"
    script = (
        f"h.zero({MiB}, {MiB}, {flags}); "
        f"h.trim({MiB}, 3 * {MiB}); "
        f"assert h.pread({MiB}, {MiB}) == bytes({MiB}); "
        f"h.flush()"
    )
    async with running_server(export(img, "z")) as srv:
        await run(*nbdsh_argv(), "-u", uri(srv, "z"), "-c", script)
    data = img.read_bytes()
    assert data[MiB : 2 * MiB] == bytes(MiB)
    assert data[:MiB] == b"\xff" * MiB
    blocks = os.stat(img).st_blocks * 512
    if not no_hole:
        assert blocks < 4 * MiB  # zeroing with holes allowed deallocated something


async def test_read_only_export_refuses_writes(tmp_path: Path) -> None:
    require_tools("nbdsh")
    img = tmp_path / "ro.raw"
    img.write_bytes(b"\x11" * MiB)
    script = (
        "import errno\n"
        "try:\n"
        "    h.pwrite(b'x' * 512, 0)\n"
        "except nbd.Error as e:\n"
        "    assert e.errno in ('EPERM', errno.EPERM) or 'EPERM' in str(e) or "
        "'read-only' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('write succeeded on a read-only export')\n"
    )
    async with running_server(export(img, "ro", read_only=True)) as srv:
        await run(*nbdsh_argv(), "-u", uri(srv, "ro"), "-c", script)
    assert img.read_bytes() == b"\x11" * MiB
