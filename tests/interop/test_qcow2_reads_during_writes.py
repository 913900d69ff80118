"""qcow2: reads are not serialized behind unrelated writes (issue 3).

One raw client pipelines large allocating writes; the data write of each is held
at a gate in front of the image file, so they stay in flight for as long as the
test wants.  Reads of other clusters, from a second client and on the writer's own
connection, must be answered while every write is still held: the replies arrive
in that order or not at all (a read queued behind a write would wait for a gate
that only opens after the reads were answered, and the test fails at its
deadlock timeout).  No timing threshold decides the outcome.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from nbdserve.block.file import FileBackend
from nbdserve.block.qcow2 import Qcow2Driver
from nbdserve.protocol.constants import Cmd
from nbdserve.server.serve import ServerHandle
from tests.conftest import require_tools
from tests.helpers.client import NbdClient
from tests.helpers.images import assert_clean, direct_io_supported, qemu_img, qemu_io
from tests.helpers.server import export, running_server

pytestmark = pytest.mark.interop

MiB = 1 << 20
WRITES = 16  # 1 MiB each, at 32 MiB + i MiB (unallocated: they allocate)
READS = 24  # 64 KiB each, inside the first 8 MiB (written by qemu-io beforehand)
DEADLOCK = 20.0  # seconds; only reached when reads wait for the held writes


@pytest.mark.parametrize("cache", ["writeback", "none"])
async def test_reads_complete_while_unrelated_writes_are_in_flight(
    tmp_path: Path, cache: str
) -> None:
    require_tools("qemu-img", "qemu-io")
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "64M")
    qemu_io(img, "write -P 0x5a 0 8M")
    if cache == "none" and not direct_io_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    async with running_server(export(img, "d", format="qcow2", cache=cache)) as srv:
        await _run(srv)
    assert_clean(img)
    out = qemu_io(
        img, "read -P 0x5a 0 8M", *(f"read -P {i + 1} {32 + i}M 1M" for i in range(WRITES))
    )
    assert out.count("read ") == WRITES + 1, out


async def _run(srv: ServerHandle) -> None:
    assert srv.registry is not None
    top = srv.registry.lookup("d").chain.top  # type: ignore[union-attr]
    assert isinstance(top, Qcow2Driver)
    data_file = top.data_file
    assert isinstance(data_file, FileBackend)
    gate = trio.Event()
    parked = 0
    first_parked = trio.Event()
    pwrite = data_file.pwrite

    async def gated_pwrite(offset: int, data: Any) -> None:
        nonlocal parked
        if memoryview(data).nbytes >= MiB // 2:  # guest data of the big writes only
            parked += 1
            first_parked.set()
            await gate.wait()
        await pwrite(offset, data)

    data_file.pwrite = gated_pwrite  # type: ignore[method-assign]
    events: list[str] = []
    host, port = srv.tcp_addresses[0]
    try:
        with trio.fail_after(DEADLOCK):
            async with (
                await NbdClient.connect_tcp(host, port) as writer,
                await NbdClient.connect_tcp(host, port) as reader,
            ):
                await writer.go("d")
                await reader.go("d")
                write_handles = set()
                for i in range(WRITES):
                    payload = bytes([i + 1]) * MiB
                    write_handles.add(
                        await writer.submit(Cmd.WRITE, (32 + i) * MiB, MiB, 0, payload)
                    )
                await first_parked.wait()
                await trio.testing.wait_all_tasks_blocked()  # let the others reach the gate
                assert parked > 0
                own_read = await writer.submit(Cmd.READ, 7 * MiB, 64 * 1024)
                for i in range(READS):
                    await reader.submit(Cmd.READ, i * 300 * 1024, 64 * 1024)
                for _ in range(READS):
                    reply = await reader.next_reply()
                    assert not reply.error
                    assert reply.data == b"\x5a" * 65536
                    events.append("read")
                # the writer's own read overtakes its writes too
                reply = await writer.next_reply()
                assert reply.handle == own_read, (reply.handle, "a write finished first")
                assert reply.data == b"\x5a" * 65536
                events.append("own read")
                held = parked
                gate.set()
                for _ in range(WRITES):
                    reply = await writer.next_reply()
                    assert reply.handle in write_handles
                    assert not reply.error
                    events.append("write")
                await writer.flush()
    except trio.TooSlowError:
        raise AssertionError(
            f"no progress in {DEADLOCK} s with {parked} writes held; replies so far: {events}"
            " (reads waiting for the writes?)"
        ) from None
    finally:
        gate.set()
    print(f"{parked} of {WRITES} writes were held at the gate while the reads completed")
    assert events == ["read"] * READS + ["own read"] + ["write"] * WRITES, events
    assert held > 0
