"""A READ that fails part-way says where: NBD_REPLY_TYPE_ERROR_OFFSET.

The image is made by qemu-img and qemu-io, then one L2 entry in the middle of
the written clusters is pointed past the end of the file; reads across it must
fail with EIO in an ERROR_OFFSET chunk naming that cluster's first byte (or the
request's first byte when the request starts inside it).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nbdserve.errors import NbdErrno
from nbdserve.protocol.constants import Cmd, CmdFlag, ReplyType
from tests.conftest import require_tools
from tests.helpers.client import ErrorPayload, NbdClient, Reply
from tests.helpers.images import qemu_img, qemu_io
from tests.helpers.qcow2_patch import l2_entry_at, put_u64, u64
from tests.helpers.server import export, running_server

KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB
BAD = 3 * CLUSTER  # the guest cluster whose L2 entry is corrupted
SIZE = 2 * MiB
_COPIED = 1 << 63


def _corrupt_image(path: Path) -> None:
    """2 MiB qcow2 with 0x11 in [0, 8 clusters) and cluster 3 mapped past EOF."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", path, str(SIZE))
    qemu_io(path, f"write -P 0x11 0 {8 * CLUSTER}")
    entry_at = l2_entry_at(path, BAD)
    assert u64(path, entry_at) & _COPIED  # a plain allocated cluster before surgery
    past_end = (os.path.getsize(path) // CLUSTER + 16) * CLUSTER
    put_u64(path, entry_at, _COPIED | past_end)


@pytest.fixture
async def client(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[NbdClient]:
    require_tools("qemu-img", "qemu-io")
    img = tmp_path / "corrupt.qcow2"
    _corrupt_image(img)
    mode: str = getattr(request, "param", "structured")
    async with running_server(export(img, "c", format="qcow2", read_only=True)) as srv:
        host, port = srv.tcp_addresses[0]
        async with await NbdClient.connect_tcp(host, port) as c:
            await c.go("c", structured=mode != "simple", extended=mode == "extended")
            yield c


def _error_chunk(reply: Reply) -> tuple[int, ErrorPayload]:
    (chunk,) = reply.chunks  # no data chunk may cover the failed range: the error alone
    assert chunk.done
    assert isinstance(chunk.body, ErrorPayload)
    return chunk.reply_type, chunk.body


@pytest.mark.parametrize("client", ["structured", "extended"], indirect=True)
@pytest.mark.parametrize(
    ("offset", "length", "flags", "where"),
    [
        (0, 8 * CLUSTER, 0, BAD),  # below the sparse-read size: one readinto
        (0, SIZE, 0, BAD),  # sparse read: block status first
        (0, SIZE, CmdFlag.DF, BAD),
        (CLUSTER, 4 * CLUSTER, 0, BAD),
        (BAD + 4 * KiB, 8 * KiB, 0, BAD + 4 * KiB),  # starts inside the bad cluster
    ],
)
async def test_read_across_a_corrupt_cluster_is_error_offset(
    client: NbdClient, offset: int, length: int, flags: int, where: int
) -> None:
    reply = await client.call(Cmd.READ, offset, length, flags)
    assert reply.error == NbdErrno.EIO
    rtype, body = _error_chunk(reply)
    assert rtype == ReplyType.ERROR_OFFSET
    assert body.offset == where
    assert "past the end" in body.message


async def test_reads_beside_the_corrupt_cluster_still_work(client: NbdClient) -> None:
    """The error chunk is specific: the clusters around the bad one read fine."""
    assert (await client.call(Cmd.READ, 0, 8 * CLUSTER)).error == NbdErrno.EIO
    assert await client.read(0, BAD) == b"\x11" * BAD
    assert await client.read(BAD + CLUSTER, CLUSTER) == b"\x11" * CLUSTER


@pytest.mark.parametrize("client", ["simple"], indirect=True)
async def test_simple_replies_get_a_plain_eio(client: NbdClient) -> None:
    reply = await client.call(Cmd.READ, 0, 8 * CLUSTER)
    assert reply.simple
    assert reply.error == NbdErrno.EIO
