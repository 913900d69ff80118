"""Load: 64 concurrent clients doing mixed I/O against one qcow2 export.

The server runs as a subprocess (``python -m nbdserve serve``), so its file
descriptors (/proc/PID/fd) and resident memory (VmRSS) can be measured
without the clients' own.  Every client has a private region, modelled byte
for byte (reads are checked live; trimmed bytes become "unknown" until
rewritten), and all clients also race on a shared region where every 4 KiB
block must always hold one whole tagged value somebody wrote, or zeros.

Phases: a warm-up run of the same load, then the baseline (fds, RSS), then
the measured run, then all clients disconnect and the server must return to
the baseline fd count and stay within ``RSS_GROWTH_LIMIT`` of the baseline
RSS.  After a graceful shutdown ``qemu-img check`` must be clean and
``qemu-img convert`` (an independent reader) must show every client's region
as modelled and every shared block whole.
"""

from __future__ import annotations

import os
import random
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import trio

from nbdserve.protocol.constants import CmdFlag
from tests.conftest import require_tools
from tests.helpers.checks import assert_clean
from tests.helpers.client import NbdClient, NbdError
from tests.helpers.server import run, server_process

pytestmark = pytest.mark.interop

KIB = 1024
MIB = 1024 * KIB
CLIENTS = 64
REGION = 1 * MIB  # per client
SHARED = 8 * MIB
SHARED_OFFSET = CLIENTS * REGION
SIZE = SHARED_OFFSET + SHARED
BLOCK = 4 * KIB  # shared-region granularity
RSS_GROWTH_LIMIT = 48 * MIB
DEFAULT_SECONDS = 15.0
SOAK_SECONDS = 180.0


def _tagged_block(client: int, seq: int) -> bytes:
    """A shared-region value: its tag determines every byte (so whole-ness is checkable)."""
    tag = b"LOAD" + struct.pack("<II", client, seq)
    return tag + random.Random(client * 1_000_003 + seq).randbytes(BLOCK - len(tag))


def _block_is_whole(block: bytes) -> bool:
    if block == bytes(BLOCK):
        return True
    if block[:4] != b"LOAD":
        return False
    client, seq = struct.unpack_from("<II", block, 4)
    return block == _tagged_block(client, seq)


@dataclass
class ClientStats:
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str) -> None:
        self.requests += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


def _differs(data: bytes, model: bytearray, known: bytearray, offset: int) -> bool:
    """Does ``data`` differ from the model anywhere the model knows the bytes?"""
    n = len(data)
    want = model[offset : offset + n]
    if data == want:
        return False
    got = np.frombuffer(data, dtype=np.uint8)
    expected = np.frombuffer(want, dtype=np.uint8)
    mask = np.frombuffer(known, dtype=np.uint8, count=n, offset=offset) != 0
    return bool(np.any((got != expected) & mask))


class LoadClient:
    """One client: private region modelled byte for byte, plus shared-region races."""

    def __init__(self, index: int, seed: int) -> None:
        self.index = index
        self.rng = random.Random(seed * 1000 + index)
        self.base = index * REGION
        self.model = bytearray(REGION)  # the image starts empty: zeros
        self.known = bytearray(b"\1" * REGION)  # 0 where a trim left bytes unspecified
        self.stats = ClientStats()
        self.seq = 0

    async def run(self, sock: Path, deadline: float) -> None:
        client = await NbdClient.connect_unix(str(sock))
        try:
            # half the clients get structured replies, half simple ones
            await client.go("", structured=bool(self.index % 2))
            while time.monotonic() < deadline:
                try:
                    await self._one(client)
                except NbdError as exc:
                    self.stats.errors.append(f"client {self.index}: {exc}")
            await client.disconnect()
        finally:
            await client.aclose()

    def _private_range(self, max_len: int = 64 * KIB) -> tuple[int, int]:
        if self.rng.random() < 0.8:  # mostly aligned, sometimes byte-granular (RMW path)
            length = self.rng.randrange(512, max_len + 1, 512)
            offset = self.rng.randrange(0, REGION - length + 1, 512)
        else:
            length = self.rng.randrange(1, 9000)
            offset = self.rng.randrange(0, REGION - length + 1)
        return offset, length

    async def _one(self, client: NbdClient) -> None:
        roll = self.rng.random()
        if roll < 0.30:
            await self._private_read(client)
        elif roll < 0.60:
            await self._private_write(client)
        elif roll < 0.67:
            await self._private_zero(client)
        elif roll < 0.72:
            await self._private_trim(client)
        elif roll < 0.78:
            await client.flush()
            self.stats.count("flush")
        elif roll < 0.90:
            await self._shared_write(client)
        else:
            await self._shared_read(client)

    async def _private_read(self, client: NbdClient) -> None:
        offset, length = self._private_range(256 * KIB)
        data = await client.read(self.base + offset, length)
        self.stats.count("read")
        if _differs(data, self.model, self.known, offset):
            self.stats.errors.append(
                f"client {self.index}: read {offset}+{length} differs from what it wrote"
            )

    async def _private_write(self, client: NbdClient) -> None:
        offset, length = self._private_range()
        data = self.rng.randbytes(length)
        fua = CmdFlag.FUA if self.rng.random() < 0.1 else 0
        await client.write(self.base + offset, data, fua)
        self.model[offset : offset + length] = data
        self.known[offset : offset + length] = b"\1" * length
        self.stats.count("write")

    async def _private_zero(self, client: NbdClient) -> None:
        offset, length = self._private_range(256 * KIB)
        flags = CmdFlag.NO_HOLE if self.rng.random() < 0.5 else 0
        await client.write_zeroes(self.base + offset, length, flags)
        self.model[offset : offset + length] = bytes(length)
        self.known[offset : offset + length] = b"\1" * length
        self.stats.count("zero")

    async def _private_trim(self, client: NbdClient) -> None:
        offset, length = self._private_range(256 * KIB)
        await client.trim(self.base + offset, length)
        self.known[offset : offset + length] = bytes(length)
        self.stats.count("trim")

    async def _shared_write(self, client: NbdClient) -> None:
        count = self.rng.randint(1, 8)
        first = self.rng.randrange(0, SHARED // BLOCK - count + 1)
        blocks = []
        for _ in range(count):
            self.seq += 1
            blocks.append(_tagged_block(self.index, self.seq))
        await client.write(SHARED_OFFSET + first * BLOCK, b"".join(blocks))
        self.stats.count("shared-write")

    async def _shared_read(self, client: NbdClient) -> None:
        count = self.rng.randint(1, 16)
        first = self.rng.randrange(0, SHARED // BLOCK - count + 1)
        await client.read(SHARED_OFFSET + first * BLOCK, count * BLOCK)
        self.stats.count("shared-read")  # racing writes: whole-ness is checked at the end

    def check_final(self, image: bytes) -> list[str]:
        got = image[self.base : self.base + REGION]
        if not _differs(got, self.model, self.known, 0):
            return []
        diff = np.frombuffer(got, dtype=np.uint8) != np.frombuffer(self.model, dtype=np.uint8)
        bad = np.flatnonzero(diff & (np.frombuffer(self.known, dtype=np.uint8) != 0))
        return [f"client {self.index}: {bad.size} bytes differ, first at region offset {bad[0]}"]


# ---- server measurements ------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def settled_fd_count(pid: int, target: int, timeout: float = 10) -> int:
    """The server closes sockets asynchronously: wait until its fd count settles."""
    count = fd_count(pid)
    with trio.move_on_after(timeout):
        while count > target:
            await trio.sleep(0.05)
            count = fd_count(pid)
    return count


async def idle_fd_count(pid: int, seconds: float = 1.0) -> int:
    """The fewest fds over a quiet second: the readiness probe's connection may
    still be closing when the server starts listening."""
    count = fd_count(pid)
    with trio.move_on_after(seconds):
        while True:
            await trio.sleep(0.05)
            count = min(count, fd_count(pid))
    return count


@dataclass
class LoadResult:
    requests: int
    errors: list[str]
    by_kind: dict[str, int]
    seconds: float


def _kinds(clients: list[LoadClient]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in clients:
        for k, v in c.stats.by_kind.items():
            out[k] = out.get(k, 0) + v
    return out


async def run_load(clients: list[LoadClient], sock: Path, seconds: float) -> LoadResult:
    """Every client connects, runs until the deadline, disconnects; counts of this run only."""
    start = time.monotonic()
    kinds_before = _kinds(clients)
    errors_before = [len(c.stats.errors) for c in clients]
    with trio.fail_after(seconds + 120):
        async with trio.open_nursery() as nursery:
            for c in clients:
                nursery.start_soon(c.run, sock, start + seconds)
    by_kind = {k: v - kinds_before.get(k, 0) for k, v in _kinds(clients).items()}
    errors = [e for c, n in zip(clients, errors_before, strict=True) for e in c.stats.errors[n:]]
    return LoadResult(sum(by_kind.values()), errors, by_kind, time.monotonic() - start)


async def load_test(tmp_path: Path, seconds: float, seed: int) -> None:
    require_tools("qemu-img")
    img = tmp_path / "load.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", img, str(SIZE))
    sock = tmp_path / "nbd.sock"
    clients = [LoadClient(i, seed) for i in range(CLIENTS)]
    with server_process(
        ["serve", "-f", "qcow2", "-k", str(sock), str(img)], socket_path=str(sock)
    ) as proc:
        idle_fds = await idle_fd_count(proc.pid)
        warm = await run_load(clients, sock, min(3.0, seconds / 4))
        assert not warm.errors, "\n".join(warm.errors[:10])
        fds_before = await settled_fd_count(proc.pid, idle_fds)
        rss_before = rss_bytes(proc.pid)
        result = await run_load(clients, sock, seconds)
        fds_after = await settled_fd_count(proc.pid, fds_before)
        rss_after = rss_bytes(proc.pid)
    print(
        f"load: clients={CLIENTS} duration={result.seconds:.1f}s requests={result.requests} "
        f"({result.requests / result.seconds:.0f}/s) errors={len(result.errors)} "
        f"mix={result.by_kind} fds idle={idle_fds} before={fds_before} after={fds_after} "
        f"rss before={rss_before / MIB:.1f}MiB after={rss_after / MIB:.1f}MiB"
    )
    assert not result.errors, "\n".join(result.errors[:10])
    assert result.requests > CLIENTS * 10
    assert fds_before == idle_fds, "the warm-up leaked server file descriptors"
    assert fds_after == fds_before, "the load leaked server file descriptors"
    assert rss_after - rss_before < RSS_GROWTH_LIMIT
    await assert_clean(img, "qcow2")
    raw = tmp_path / "load.raw"
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, raw)
    image = raw.read_bytes()
    failures = [f for c in clients for f in c.check_final(image)]
    shared = image[SHARED_OFFSET:]
    torn = [i for i in range(0, SHARED, BLOCK) if not _block_is_whole(shared[i : i + BLOCK])]
    failures += [f"shared block at {SHARED_OFFSET + i:#x} is not one whole value" for i in torn]
    assert not failures, "\n".join(failures[:10])


async def test_64_clients_mixed_io(tmp_path: Path) -> None:
    await load_test(tmp_path, DEFAULT_SECONDS, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_64_clients_mixed_io_soak(tmp_path: Path) -> None:
    await load_test(tmp_path, SOAK_SECONDS, seed=2)


def test_final_check_can_fail() -> None:
    """The final comparison notices a lost write, and a torn shared block."""
    c = LoadClient(0, 0)
    c.model[10:20] = b"x" * 10
    image = bytearray(SIZE)
    assert c.check_final(bytes(image))
    image[10:20] = b"x" * 10
    assert not c.check_final(bytes(image))
    c.known[10:12] = b"\0\0"  # trimmed: anything goes there
    image[10:12] = b"??"
    assert not c.check_final(bytes(image))
    whole = _tagged_block(3, 4)
    assert _block_is_whole(whole)
    assert not _block_is_whole(whole[:2048] + _tagged_block(5, 6)[2048:])
