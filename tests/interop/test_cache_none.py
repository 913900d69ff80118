"""cache=none (O_DIRECT): served data and images stay right with unaligned requests."""

from __future__ import annotations

import fcntl
import os
import random
import sys
from pathlib import Path

import pytest

from nbdserve.block.file import FileBackend
from nbdserve.block.fvd import FvdDriver
from nbdserve.block.qcow2 import Qcow2Driver
from nbdserve.protocol.constants import Cmd
from tests.conftest import require_tools
from tests.helpers.client import NbdClient
from tests.helpers.images import direct_io_supported
from tests.helpers.server import export, run, running_server, server_process, unix_uri, uri

MiB = 1024 * 1024


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    if not direct_io_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    return tmp_path


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "parallels"])
async def test_unaligned_writes_and_reads_with_cache_none(direct_dir: Path, fmt: str) -> None:
    require_tools("qemu-img", "qemu-io")
    img = direct_dir / f"disk.{fmt}"
    await run("qemu-img", "create", "-f", fmt, img, "8M")
    rng = random.Random(11)
    writes = [(rng.randrange(0, 8 * MiB - 70_000), rng.randrange(1, 70_000)) for _ in range(12)]
    async with running_server(export(img, "d", format=fmt, cache="none")) as srv:
        assert srv.registry is not None
        file = srv.registry.lookup("d").chain.top.file  # type: ignore[union-attr]
        assert isinstance(file, FileBackend)
        assert fcntl.fcntl(file.fd, fcntl.F_GETFL) & os.O_DIRECT
        cmds = []
        for i, (off, n) in enumerate(writes):
            cmds += ["-c", f"write -P {i + 1} {off} {n}"]
        await run("qemu-io", "-f", "raw", *cmds, uri(srv, "d"))
        served = direct_dir / "served.raw"
        await run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(srv, "d"), served)
    expected = bytearray(8 * MiB)
    for i, (off, n) in enumerate(writes):
        expected[off : off + n] = bytes([i + 1]) * n
    assert served.read_bytes() == expected
    if fmt != "raw":
        await run("qemu-img", "check", "-f", fmt, img)
    out = direct_dir / "out.raw"
    await run("qemu-img", "convert", "-f", fmt, "-O", "raw", img, out)
    assert out.read_bytes() == expected


def _fd_is_direct(fd: int) -> bool:
    """O_DIRECT in the kernel's view of ``fd`` (/proc fdinfo flags are octal)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        flags = next(line for line in f if line.startswith("flags:")).split()[1]
    return bool(int(flags, 8) & os.O_DIRECT)


@pytest.mark.parametrize("cache", ["none", "writeback"])
async def test_qcow2_external_data_file_follows_the_cache_mode(
    direct_dir: Path, cache: str
) -> None:
    """The data file named inside the image is opened in the export's cache mode."""
    require_tools("qemu-img", "qemu-io")
    img, data = direct_dir / "disk.qcow2", direct_dir / "disk.data"
    await run("qemu-img", "create", "-f", "qcow2", "-o", f"data_file={data}", img, "8M")
    async with running_server(export(img, "d", format="qcow2", cache=cache)) as srv:
        assert srv.registry is not None
        top = srv.registry.lookup("d").chain.top  # type: ignore[union-attr]
        assert isinstance(top, Qcow2Driver)
        assert isinstance(top.file, FileBackend)
        assert top.data_file is not top.file
        assert _fd_is_direct(top.file.fd) == (cache == "none")
        assert _fd_is_direct(top.data_file.fd) == (cache == "none")
        await run("qemu-io", "-f", "raw", "-c", "write -P 7 1000 70000", uri(srv, "d"))
    await run("qemu-img", "check", "-f", "qcow2", img)
    out = direct_dir / "out.raw"
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, out)
    assert out.read_bytes() == bytes(1000) + b"\x07" * 70000 + bytes(8 * MiB - 71000)


def _image_fds_direct(pid: int, path: Path) -> list[bool]:
    """O_DIRECT of every descriptor process ``pid`` holds on ``path`` (from /proc)."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                flags = next(line for line in f if line.startswith("flags:")).split()[1]
        except OSError:  # closed meanwhile
            continue
        if target == str(path):
            out.append(bool(int(flags, 8) & os.O_DIRECT))
    return out


@pytest.mark.parametrize("cache", ["none", "writeback"])
async def test_cli_cache_flag(direct_dir: Path, cache: str) -> None:
    """``nbdserve serve --cache MODE`` in a child process: the image and its backing
    file are open with O_DIRECT exactly when MODE is none, and qemu-io's unaligned
    write through it lands."""
    require_tools("qemu-img", "qemu-io")
    base, img = direct_dir / "base.raw", direct_dir / "disk.qcow2"
    await run("qemu-img", "create", "-q", "-f", "raw", base, "8M")
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", img)
    sock = direct_dir / "nbd.sock"
    argv = ["serve", "--cache", cache, "-f", "qcow2", "-k", str(sock), str(img)]
    with server_process(argv, socket_path=str(sock)) as proc:
        await run("qemu-io", "-f", "raw", "-c", "write -P 7 1000 70000", unix_uri(sock))
        assert _image_fds_direct(proc.pid, img) == [cache == "none"]
        assert _image_fds_direct(proc.pid, base) == [cache == "none"]
    await run("qemu-img", "check", "-f", "qcow2", img)
    out = direct_dir / "out.raw"
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, out)
    assert out.read_bytes() == bytes(1000) + b"\x07" * 70000 + bytes(8 * MiB - 71000)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_pipelined_reads_of_page_cached_data_with_cache_none(
    direct_dir: Path, fmt: str
) -> None:
    """Data in the page cache (just written by qemu-io) read back through a cache=none
    export by a client that sends many large reads before it takes any reply: the
    socket accepts the replies in partial, unaligned pieces.  (A sendfile from the
    O_DIRECT descriptor failed with EINVAL on the first unaligned continuation and
    the connection was dropped.)"""
    require_tools("qemu-img", "qemu-io")
    img = direct_dir / f"disk.{fmt}"
    await run("qemu-img", "create", "-q", "-f", fmt, img, "16M")
    await run("qemu-io", "-f", fmt, "-c", "write -P 0x3c 0 16M", img)
    async with running_server(export(img, "d", format=fmt, cache="none")) as srv:
        host, port = srv.tcp_addresses[0]
        async with await NbdClient.connect_tcp(host, port) as client:
            await client.go("d")
            handles = [await client.submit(Cmd.READ, i * 256 * 1024, 256 * 1024) for i in range(48)]
            replies = await client.replies(len(handles))
    assert sorted(replies) == sorted(handles)
    for reply in replies.values():
        assert not reply.error
        assert reply.data == b"\x3c" * (256 * 1024)


@pytest.mark.parametrize("cache", ["none", "writeback"])
async def test_fvd_data_file_follows_the_cache_mode(direct_dir: Path, cache: str) -> None:
    """An FVD image's separate data file is opened in the export's cache mode too."""
    require_tools("qemu-io", "qemu-img")
    img, data = direct_dir / "disk.fvd", direct_dir / "disk.data"
    await run(sys.executable, "-m", "nbdserve", "img", "create", "-f", "fvd",
              "-o", f"data_file={data.name}", img, "8M")  # fmt: skip
    async with running_server(export(img, "d", format="fvd", cache=cache)) as srv:
        assert srv.registry is not None
        top = srv.registry.lookup("d").chain.top  # type: ignore[union-attr]
        assert isinstance(top, FvdDriver)
        store = top._store
        assert store is not top.file
        assert top.file is not None
        assert _fd_is_direct(top.file.fd) == (cache == "none")
        assert _fd_is_direct(store.fd) == (cache == "none")
        await run("qemu-io", "-f", "raw", "-c", "write -P 7 1000 70000", uri(srv, "d"))
        out = direct_dir / "out.raw"
        await run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(srv, "d"), out)
    assert out.read_bytes() == bytes(1000) + b"\x07" * 70000 + bytes(8 * MiB - 71000)
