"""Real NBD clients against a served raw image (the foundation's interop tier)."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import require_tools
from tests.helpers.server import (
    export,
    free_port,
    nbdsh_argv,
    run,
    running_server,
    server_process,
    unix_uri,
    uri,
)

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


# ---- command flags and commands through libnbd (nbdsh) ----------------------

_HOLE, _ZERO = 1, 2  # base:allocation flags (proto.md)


async def _nbdsh_json(target: str, body: str) -> dict[str, Any]:
    """Run ``body`` in nbdsh connected to ``target`` with base:allocation; it
    fills the dict ``out``, which comes back parsed."""
    script = (
        "import json\n"
        "h.add_meta_context('base:allocation')\n"
        f"h.connect_uri({target!r})\n"
        "out = {}\n"
        "def extents(ctx, offset, entries, err):\n"
        "    out.setdefault('extents', []).append((offset, list(entries)))\n"
        "    return 0\n"
        "def chunks(buf, offset, status, err):\n"
        "    out.setdefault('chunks', []).append((offset, len(buf), status))\n"
        "    return 0\n"
        f"{body}\n"
        "print(json.dumps(out))\n"
    )
    result: dict[str, Any] = json.loads(await run(*nbdsh_argv(), "-c", script))
    return result


def _pairs(entries: list[int]) -> list[tuple[int, int]]:
    """libnbd's flat [length, flags, length, flags, ...] as (length, flags) pairs."""
    return list(zip(entries[::2], entries[1::2], strict=True))


async def test_zero_with_no_hole_keeps_the_range_allocated(tmp_path: Path) -> None:
    require_tools("nbdsh")
    img = tmp_path / "nh.raw"
    img.write_bytes(b"\xff" * (4 * MiB))
    os.sync()  # written back: every block of the file is allocated
    before = os.stat(img).st_blocks * 512
    assert before >= 4 * MiB
    async with running_server(export(img, "nh")) as srv:
        out = await _nbdsh_json(
            uri(srv, "nh"),
            f"h.zero({MiB}, {MiB}, nbd.CMD_FLAG_NO_HOLE)\n"
            f"out['zeros'] = h.pread({MiB}, {MiB}) == bytes({MiB})\n"
            f"h.block_status({MiB}, {MiB}, extents)\n"
            "h.flush()\n",
        )
        no_hole = os.stat(img).st_blocks * 512
        # the comparison case: without NO_HOLE the server may (and does) punch
        await _nbdsh_json(uri(srv, "nh"), f"h.zero({MiB}, {MiB})\nh.flush()\n")
        punched = os.stat(img).st_blocks * 512
    assert out["zeros"] is True
    assert no_hole == before  # NO_HOLE: zeroed in place, no host space given back
    assert punched == before - MiB
    (offset, entries), *_ = out["extents"]
    assert offset == MiB
    length, flags = _pairs(entries)[0]
    assert length == MiB
    assert flags & _ZERO  # the server knows the range reads as zeros
    assert img.read_bytes()[:MiB] == b"\xff" * MiB


async def test_cache_through_nbdsh(tmp_path: Path) -> None:
    require_tools("nbdsh")
    img = tmp_path / "c.raw"
    data = _patterned(img, 4 * MiB, seed=11)
    async with running_server(export(img, "c")) as srv:
        out = await _nbdsh_json(
            uri(srv, "c"),
            "out['can_cache'] = h.can_cache()\n"
            f"h.cache({2 * MiB}, {MiB})\n"
            f"out['after'] = h.pread(4096, {MiB}).hex()\n"
            "try:\n"
            f"    h.cache(8192, {4 * MiB - 4096})\n"  # past the end: refused
            "    out['past_end'] = 'accepted'\n"
            "except nbd.Error as e:\n"
            "    out['past_end'] = e.errno\n",
        )
    assert out["can_cache"] is True
    assert bytes.fromhex(str(out["after"])) == data[MiB : MiB + 4096]
    assert out["past_end"] in (22, "EINVAL"), out  # EINVAL, not a dropped connection


async def test_block_status_req_one_returns_one_extent(tmp_path: Path) -> None:
    require_tools("nbdsh")
    img = tmp_path / "r1.raw"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
        for start in (MiB, 3 * MiB, 5 * MiB):
            f.seek(start)
            f.write(b"\x42" * MiB)
    async with running_server(export(img, "r1")) as srv:
        out = await _nbdsh_json(
            uri(srv, "r1"),
            f"h.block_status({8 * MiB}, 0, extents)\n"
            f"h.block_status({8 * MiB}, 0, extents, nbd.CMD_FLAG_REQ_ONE)\n"
            f"h.block_status({4 * MiB}, {MiB + 4096}, extents, nbd.CMD_FLAG_REQ_ONE)\n",
        )
    full, one, inside = out["extents"]
    assert _pairs(full[1]) == [
        (MiB, 3),
        (MiB, 0),
        (MiB, 3),
        (MiB, 0),
        (MiB, 3),
        (MiB, 0),
        (2 * MiB, 3),
    ]
    assert one == [0, [MiB, 3]]  # one extent, no longer than the first
    assert inside == [MiB + 4096, [MiB - 4096, 0]]  # starts where asked, ends with the run


async def _read_chunks(target: str, flags: str) -> list[tuple[int, int, int]]:
    out = await _nbdsh_json(target, f"h.pread_structured({4 * MiB}, 0, chunks, {flags})")
    return [tuple(c) for c in out["chunks"]]


async def test_df_read_of_a_sparse_image_is_one_data_chunk(tmp_path: Path) -> None:
    require_tools("nbdsh")
    img = tmp_path / "df.raw"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"\x33" * MiB)
    read_data, read_hole = 1, 2  # nbd.READ_DATA, nbd.READ_HOLE
    async with running_server(export(img, "df")) as srv:
        plain = await _read_chunks(uri(srv, "df"), "0")
        df = await _read_chunks(uri(srv, "df"), "nbd.CMD_FLAG_DF")
    # without DF the holes come as hole chunks ...
    assert sorted(plain) == [
        (0, MiB, read_hole),
        (MiB, MiB, read_data),
        (2 * MiB, 2 * MiB, read_hole),
    ]
    # ... with DF: one data chunk for the whole 4 MiB, no hole chunk
    assert df == [(0, 4 * MiB, read_data)]


async def test_shared_one_refuses_a_second_nbdinfo(tmp_path: Path) -> None:
    require_tools("nbdsh", "nbdinfo")
    img = tmp_path / "s1.raw"
    img.write_bytes(bytes(MiB))
    async with running_server(export(img, "s1", shared=1)) as srv:
        target = uri(srv, "s1")
        await _refused_while_held(target)
        # the slot is given back when the first client leaves
        await _eventually_served(target)


async def _refused_while_held(target: str) -> None:
    """Hold one connection with nbdsh; a second client (nbdinfo) must be refused."""
    hold = f"import sys\nh.connect_uri({target!r})\nprint('ready', flush=True)\nsys.stdin.read()\n"
    holder = await trio.lowlevel.open_process(
        [*nbdsh_argv(), "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert holder.stdin is not None
        with trio.fail_after(30):
            assert b"ready" in await holder.stdout.receive_some(64)
        second = await trio.run_process(
            ["nbdinfo", "--json", target], capture_stdout=True, capture_stderr=True, check=False
        )
        assert second.returncode != 0, second.stdout
        # refused at NBD_OPT_GO (NBD_REP_ERR_POLICY; libnbd 1.14 does not print
        # the server's text); the same call succeeds once the holder has left
        assert b"opt_go" in second.stderr, second.stderr
        await holder.stdin.aclose()  # the holder's read ends: it disconnects
        with trio.fail_after(30):
            assert await holder.wait() == 0
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


async def _eventually_served(target: str) -> None:
    with trio.fail_after(10):
        while True:
            result = await trio.run_process(
                ["nbdinfo", "--size", target], capture_stdout=True, capture_stderr=True, check=False
            )
            if result.returncode == 0:
                assert int(result.stdout) == MiB
                return
            await trio.sleep(0.1)


async def test_cli_long_options_through_real_clients(tmp_path: Path) -> None:
    """``nbdserve serve`` with every listener/export long option, checked by clients."""
    require_tools("nbdsh", "nbdinfo")
    img = tmp_path / "long.raw"
    img.write_bytes(b"\x09" * MiB)
    sock = tmp_path / "long.sock"
    port = free_port()
    args = [
        "serve",
        "--export=longname",
        "--description",
        "set by long options",
        "--read-only",
        "--shared",
        "1",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--socket",
        str(sock),
        str(img),
    ]
    tcp_uri = f"nbd://127.0.0.1:{port}/longname"
    with server_process(args, socket_path=str(sock)):
        doc = json.loads(await run("nbdinfo", "--json", unix_uri(sock, "longname")))
        info = doc["exports"][0]
        assert info["export-name"] == "longname"
        assert info["description"] == "set by long options"
        assert info["is_read_only"] is True
        assert info["can_multi_conn"] is False  # one client only: nothing to promise
        # --bind/--port listen as well as --socket; --shared 1 refuses a second client
        await _refused_while_held(tcp_uri)
        await _eventually_served(unix_uri(sock, "longname"))
    assert img.read_bytes() == b"\x09" * MiB
