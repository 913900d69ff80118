"""NbdClientDriver: URI parsing, reads and block status against real servers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from nbdserve.block.base import Status
from nbdserve.block.chain import ChainOptions, open_chain
from nbdserve.block.device import BlockDevice
from nbdserve.block.nbdclient import NbdAddress, open_nbd_uri, parse_nbd_uri
from nbdserve.errors import BackingChainError
from tests.conftest import require_tools
from tests.helpers.server import export, running_server, unix_uri, uri

from .fvd.helpers import KIB, MIB, make_image


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("nbd://example.com/disk", NbdAddress("disk", "example.com")),
        ("nbd+unix:///disk?socket=sock", NbdAddress("disk", socket="sock")),
        ("nbd://example.com/", NbdAddress("", "example.com")),
        ("nbd://example.com", NbdAddress("", "example.com")),
        ("nbd://example.com//disk", NbdAddress("/disk", "example.com")),
        ("nbd://example.com/hello%20world", NbdAddress("hello world", "example.com")),
        ("nbd://127.0.0.1:10900/x", NbdAddress("x", "127.0.0.1", 10900)),
        ("nbd://[::1]:10900/x", NbdAddress("x", "::1", 10900)),
        ("nbd+unix:///?socket=/tmp/a%20b.sock", NbdAddress("", socket="/tmp/a b.sock")),
    ],
)
def test_parse_uri_examples_of_uri_md(text: str, address: NbdAddress) -> None:
    assert parse_nbd_uri(text) == address


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nbds://example.com/disk", "TLS"),
        ("nbds+unix:///disk?socket=s", "TLS"),
        ("nbd+unix:///disk", "socket="),
        ("nbd://example.com/disk?foo=1", "unknown query parameter 'foo'"),
        ("nbd:///disk", "needs a host"),
        ("http://example.com/", "not an NBD URI"),
        ("nbd://example.com:99999/", "bad port"),
    ],
)
def test_parse_uri_refuses(text: str, message: str) -> None:
    with pytest.raises(BackingChainError, match=message):
        parse_nbd_uri(text)


def sparse_disk(path: Path) -> bytes:
    data = bytearray(4 * MIB)
    rng = random.Random(4)
    data[MIB : 2 * MIB] = rng.randbytes(MIB)
    data[3 * MIB : 3 * MIB + 4096] = rng.randbytes(4096)
    with open(path, "wb") as f:
        f.truncate(4 * MIB)
        f.seek(MIB)
        f.write(data[MIB : 2 * MIB])
        f.seek(3 * MIB)
        f.write(data[3 * MIB : 3 * MIB + 4096])
    return bytes(data)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_reads_and_block_status_from_nbdserve(tmp_path: Path, transport: str) -> None:
    data = sparse_disk(tmp_path / "disk.raw")
    sock = tmp_path / "s.sock"
    async with running_server(
        export(tmp_path / "disk.raw", "disk", read_only=True), socket_path=sock
    ) as srv:
        target = uri(srv, "disk") if transport == "tcp" else unix_uri(sock, "disk")
        driver = await open_nbd_uri(target)
        try:
            assert driver.size == 4 * MIB
            dev = BlockDevice(driver, read_only=True)
            assert await dev.read(0, 4 * MIB) == data
            assert await dev.read(MIB - 7, 100) == data[MIB - 7 : MIB + 93]
            results: dict[int, bytes] = {}

            async def read(i: int) -> None:
                results[i] = await dev.read(i * 64 * KIB, 64 * KIB)

            async with trio.open_nursery() as nursery:
                for i in range(64):
                    nursery.start_soon(read, i)
            assert b"".join(results[i] for i in range(64)) == data
            ext = await driver.block_status(0, 4 * MIB)
            assert ext[0].offset == 0
            assert sum(e.length for e in ext) <= 4 * MIB
            data_ranges = [(e.offset, e.end) for e in ext if e.status & Status.DATA]
            assert (MIB, 2 * MIB) in data_ranges
            assert all(e.status & Status.ZERO for e in ext if e.end <= MIB)
        finally:
            await driver.aclose()


async def test_reads_from_qemu_nbd(tmp_path: Path) -> None:
    require_tools("qemu-nbd")
    data = sparse_disk(tmp_path / "disk.raw")
    sock = tmp_path / "q.sock"
    proc = await trio.lowlevel.open_process(
        [
            "qemu-nbd",
            "-f",
            "raw",
            "-r",
            "-x",
            "q",
            "-k",
            str(sock),
            "-t",
            str(tmp_path / "disk.raw"),
        ]
    )
    try:
        with trio.fail_after(10):
            # the socket file appears at bind(), before qemu-nbd listens: wait
            # until a connection is accepted
            while True:
                try:
                    probe = await trio.open_unix_socket(str(sock))
                except OSError:
                    await trio.sleep(0.02)
                    continue
                await probe.aclose()
                break
        driver = await open_nbd_uri(unix_uri(sock, "q"))
        try:
            assert await BlockDevice(driver, read_only=True).read(0, 4 * MIB) == data
            ext = await driver.block_status(0, 4 * MIB)
            assert any(e.status & Status.DATA for e in ext)
        finally:
            await driver.aclose()
    finally:
        proc.terminate()
        with trio.move_on_after(5):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_unknown_export_is_a_clear_error(tmp_path: Path) -> None:
    sparse_disk(tmp_path / "disk.raw")
    async with running_server(export(tmp_path / "disk.raw", "disk")) as srv:
        with pytest.raises(BackingChainError, match="export 'nope' refused"):
            await open_nbd_uri(uri(srv, "nope"))


async def test_nothing_listening_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BackingChainError, match="cannot connect"):
        await open_nbd_uri(unix_uri(tmp_path / "none.sock", "x"))


async def test_chain_opens_nbd_bases_only_when_allowed(tmp_path: Path) -> None:
    data = sparse_disk(tmp_path / "disk.raw")
    sock = tmp_path / "base.sock"
    async with running_server(
        export(tmp_path / "disk.raw", "base", read_only=True), socket_path=sock, tcp=False
    ):
        await make_image(tmp_path / "img.fvd", 4 * MIB, unix_uri(sock, "base"), base_fmt=None)
        with pytest.raises(BackingChainError, match="allow_nbd_backing"):
            await open_chain(str(tmp_path / "img.fvd"), ChainOptions())
        chain = await open_chain(
            str(tmp_path / "img.fvd"), ChainOptions(settings={"allow_nbd_backing": True})
        )
        try:
            assert [layer.format_name for layer in chain.layers] == ["fvd", "nbd"]
            assert await BlockDevice(chain.top).read(0, 4 * MIB) == data
        finally:
            await chain.aclose()
