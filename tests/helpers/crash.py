"""Crash-consistency pieces: a per-unit model of what may survive, and a workload.

Design notes
------------
* The guest disk is cut into ``UNIT``-byte units.  Every write request covers
  whole units and gives each unit a fresh value (a tag naming the round,
  request and unit, then random bytes), so a value read back names the
  request that wrote it.
* Per unit the model keeps a *history*: one entry per request that touched the
  unit, oldest first, each with the set of values the unit may hold once that
  request completed (one value for WRITE/WRITE_ZEROES; for TRIM the previous
  values plus zeros and the backing content, because trimmed data is
  unspecified but must never be garbage).  An entry is *durable* once its
  request was acknowledged with FUA, or acknowledged before a FLUSH was sent
  whose reply then arrived (NBD: a flush covers the writes that completed
  before it was received).  After a crash a unit may hold the values of its
  last durable entry or of any later entry: nothing acknowledged as durable
  is lost (a), and nothing else is garbage (b).
* The workload never has two requests in flight on the same unit, so a unit's
  history is totally ordered; it does pipeline up to ``depth`` requests on
  different units, with FLUSH overlapping writes, as real clients do.
* Only replies actually received count: a reply lost in the dying socket
  merely leaves its request "maybe done", which the model allows.
* A unit whose bytes match none of its possible values as a whole, but where
  every byte equals that byte of some possible value, is *torn*: allowed
  (a request is not atomic), counted, and reported.
"""

from __future__ import annotations

import os
import random
import signal
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import trio

from nbdserve.protocol.constants import Cmd, CmdFlag, TxFlag
from tests.helpers.client import NbdClient, Reply

UNIT = 4096
ZERO_UNIT = bytes(UNIT)


class _Entry:
    """One request's effect on one unit."""

    __slots__ = ("durable", "unit", "values")

    def __init__(self, unit: int, values: frozenset[bytes], durable: bool = False) -> None:
        self.unit = unit
        self.values = values
        self.durable = durable


class UnitModel:
    """Possible contents of every unit, before and after a crash."""

    def __init__(self, initial: Sequence[bytes], base: Sequence[bytes]) -> None:
        assert len(initial) == len(base)
        self.base = list(base)
        self.history: list[list[_Entry]] = [
            [_Entry(u, frozenset({v}), durable=True)] for u, v in enumerate(initial)
        ]

    @property
    def units(self) -> int:
        return len(self.history)

    def apply_write(self, first: int, values: Sequence[bytes]) -> list[_Entry]:
        return [self._append(first + i, frozenset({v})) for i, v in enumerate(values)]

    def apply_trim(self, first: int, count: int) -> list[_Entry]:
        out = []
        for u in range(first, first + count):
            previous = self.history[u][-1].values
            out.append(self._append(u, previous | {ZERO_UNIT, self.base[u]}))
        return out

    def _append(self, unit: int, values: frozenset[bytes]) -> _Entry:
        entry = _Entry(unit, values)
        self.history[unit].append(entry)
        return entry

    def mark_durable(self, entries: Sequence[_Entry]) -> None:
        """These requests' effects are durable: older history no longer matters."""
        for entry in entries:
            entry.durable = True
            h = self.history[entry.unit]
            for i in range(len(h) - 1, -1, -1):
                if h[i] is entry:
                    del h[:i]
                    break

    def current(self, unit: int) -> frozenset[bytes]:
        """What the unit reads as now (no crash): its last request's values."""
        return self.history[unit][-1].values

    def possible(self, unit: int) -> list[bytes]:
        """What the unit may read as after a crash."""
        h = self.history[unit]
        last_durable = max(i for i, e in enumerate(h) if e.durable)
        out: set[bytes] = set()
        for e in h[last_durable:]:
            out |= e.values
        return sorted(out)


def describe(value: bytes) -> str:
    """A value's tag, for failure messages."""
    if value == ZERO_UNIT:
        return "zeros"
    if value[:4] == b"NBDT":
        rnd, req, unit = struct.unpack_from("<III", value, 4)
        return f"round {rnd} request {req} unit {unit}"
    return f"untagged {value[:16].hex()}"


@dataclass
class Verdict:
    """Result of comparing the image with the model."""

    failures: list[str] = field(default_factory=list)
    torn_units: int = 0


def check_unit(unit: int, got: bytes, possible: Sequence[bytes], verdict: Verdict) -> None:
    if got in possible:
        return
    stacked = np.frombuffer(b"".join(possible), dtype=np.uint8).reshape(len(possible), UNIT)
    ok = (stacked == np.frombuffer(got, dtype=np.uint8)).any(axis=0)
    if ok.all():
        verdict.torn_units += 1
        return
    bad = int(np.flatnonzero(~ok)[0])
    verdict.failures.append(
        f"unit {unit} (offset {unit * UNIT:#x}): byte {bad} holds none of its possible values; "
        f"read {describe(got)}, possible: {', '.join(describe(v) for v in possible)}"
    )


async def receive_reply(client: NbdClient) -> Reply | None:
    """The next reply, or None once the server is gone (EOF or reset)."""
    while (reply := client.codec.reply()) is None:
        try:
            data = await client.stream.receive_some(1 << 20)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        if not data:
            return None
        client.codec.receive_data(data)
    return reply


async def read_all(client: NbdClient, units: int, chunk_units: int = 256) -> list[bytes]:
    """Every unit's bytes, read in big requests."""
    out: list[bytes] = []
    for first in range(0, units, chunk_units):
        n = min(chunk_units, units - first)
        data = await client.read(first * UNIT, n * UNIT)
        out.extend(data[i * UNIT : (i + 1) * UNIT] for i in range(n))
    return out


def verify(model: UnitModel, contents: Sequence[bytes]) -> Verdict:
    verdict = Verdict()
    for u, got in enumerate(contents):
        check_unit(u, got, model.possible(u), verdict)
    return verdict


@dataclass
class WorkloadStats:
    sent: int = 0
    replies: int = 0
    writes_acked: int = 0
    flushes_acked: int = 0
    fua_acked: int = 0
    zeroes_acked: int = 0
    trims_acked: int = 0
    reads_checked: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class _Pending:
    cmd: int
    units: range
    entries: list[_Entry]
    fua: bool = False
    covers: list[_Entry] = field(default_factory=list)  # FLUSH: entries acked before it


class Workload:
    """Pipelined seeded requests over one connection, tracked in a :class:`UnitModel`.

    ``run()`` returns when the server goes away (the caller kills it) or after
    ``max_requests``.  Any error reply or wrong read is recorded in
    ``stats.errors`` (the caller asserts there are none).
    """

    def __init__(
        self,
        client: NbdClient,
        model: UnitModel,
        rng: random.Random,
        *,
        round_no: int,
        export_flags: int,
        depth: int = 8,
        max_units: int = 16,
    ) -> None:
        self.client = client
        self.model = model
        self.rng = rng
        self.round_no = round_no
        self.flags = export_flags
        self.depth = depth
        self.max_units = max_units
        self.stats = WorkloadStats()
        self._busy = bytearray(model.units)
        self._pending: dict[int, _Pending] = {}
        self._acked: list[_Entry] = []  # acknowledged, not yet known durable
        self._slots = trio.Semaphore(depth)
        self._gone = False

    async def run(self, max_requests: int = 1 << 30) -> WorkloadStats:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receiver, nursery.cancel_scope)
            try:
                for _ in range(max_requests):
                    await self._slots.acquire()
                    if self._gone:
                        break
                    await self._send_one()
                # let the last replies arrive (or the server die)
                while self._pending and not self._gone:
                    await self._slots.acquire()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the server died while we were sending
            nursery.cancel_scope.cancel()
        return self.stats

    # ---- sending ------------------------------------------------------

    async def _send_one(self) -> None:
        roll = self.rng.random()
        if roll < 0.10 and self.flags & TxFlag.SEND_FLUSH:
            await self._submit(Cmd.FLUSH, range(0), [], covers=list(self._acked))
            return
        span = self._free_span()
        if span is None:  # everything near is busy: a flush keeps the pipe full
            await self._submit(Cmd.FLUSH, range(0), [], covers=list(self._acked))
            return
        first, count = span
        units = range(first, first + count)
        if roll < 0.18:
            await self._submit(Cmd.READ, units, [])
        elif roll < 0.26 and self.flags & TxFlag.SEND_WRITE_ZEROES:
            flags = 0 if self.rng.random() < 0.5 else CmdFlag.NO_HOLE
            entries = self.model.apply_write(first, [ZERO_UNIT] * count)
            await self._submit(Cmd.WRITE_ZEROES, units, entries, flags=flags)
        elif roll < 0.32 and self.flags & TxFlag.SEND_TRIM:
            entries = self.model.apply_trim(first, count)
            await self._submit(Cmd.TRIM, units, entries)
        else:
            fua = bool(self.flags & TxFlag.SEND_FUA) and self.rng.random() < 0.1
            values = [self._value(u) for u in units]
            entries = self.model.apply_write(first, values)
            await self._submit(
                Cmd.WRITE,
                units,
                entries,
                flags=CmdFlag.FUA if fua else 0,
                payload=b"".join(values),
            )

    def _free_span(self) -> tuple[int, int] | None:
        for _ in range(8):
            count = min(self.rng.randint(1, self.max_units), self.model.units)
            first = self.rng.randrange(0, self.model.units - count + 1)
            if not any(self._busy[first : first + count]):
                return first, count
        return None

    def _value(self, unit: int) -> bytes:
        tag = b"NBDT" + struct.pack("<III", self.round_no, self.stats.sent, unit)
        return tag + self.rng.randbytes(UNIT - len(tag))

    async def _submit(
        self,
        cmd: int,
        units: range,
        entries: list[_Entry],
        *,
        flags: int = 0,
        payload: bytes = b"",
        covers: list[_Entry] | None = None,
    ) -> None:
        for u in units:
            self._busy[u] = 1
        offset, length = units.start * UNIT, len(units) * UNIT
        handle = self.client.new_handle()
        self._pending[handle] = _Pending(
            cmd, units, entries, bool(flags & CmdFlag.FUA), covers or []
        )
        self.stats.sent += 1
        raw = self.client.codec.request(cmd, handle, offset, length, flags, payload)
        await self.client.send(raw)

    # ---- receiving ----------------------------------------------------

    async def _receiver(self, scope: trio.CancelScope) -> None:
        while True:
            reply = await receive_reply(self.client)
            if reply is None:
                self._gone = True
                # wake the sender so it notices
                for _ in range(self.depth):
                    self._slots.release()
                return
            self.stats.replies += 1
            self._complete(reply)
            self._slots.release()

    def _complete(self, reply: Reply) -> None:
        p = self._pending.pop(reply.handle)
        for u in p.units:
            self._busy[u] = 0
        if reply.error:
            self.stats.errors.append(
                f"command {Cmd(p.cmd).name} units {p.units} failed: {reply.error} {reply.message}"
            )
            return
        if p.cmd == Cmd.FLUSH:
            self.model.mark_durable(p.covers)
            self._acked = [e for e in self._acked if not e.durable]
            self.stats.flushes_acked += 1
        elif p.cmd == Cmd.READ:
            self._check_read(p.units, reply.data or b"")
        else:
            self._count_ack(p)
            if p.fua:
                self.model.mark_durable(p.entries)
            else:
                self._acked.extend(p.entries)

    def _count_ack(self, p: _Pending) -> None:
        if p.cmd == Cmd.WRITE:
            self.stats.writes_acked += 1
            self.stats.fua_acked += p.fua
        elif p.cmd == Cmd.WRITE_ZEROES:
            self.stats.zeroes_acked += 1
        else:
            self.stats.trims_acked += 1

    def _check_read(self, units: range, data: bytes) -> None:
        self.stats.reads_checked += 1
        for i, u in enumerate(units):
            got = data[i * UNIT : (i + 1) * UNIT]
            if got not in self.model.current(u):
                self.stats.errors.append(
                    f"live read of unit {u} returned {describe(got)}, expected one of "
                    f"{', '.join(describe(v) for v in self.model.current(u))}"
                )


async def kill_after(pid: int, delay: float) -> None:
    await trio.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
