"""PageInWaits: which waiting reads are answered, handed on, or not taken at all.

The reader here stands for a file whose pages arrive after a number of tries
(the interop test drives the real thing through a server and nbdsh); time is
passed in, so the deadlines are exact.
"""

from __future__ import annotations

import pytest

from nbdserve.protocol import events as ev
from nbdserve.protocol.constants import Cmd
from nbdserve.server import pagein
from nbdserve.server.pagein import PageInWaits


class Pages:
    """Offsets whose pages come in after ``tries`` reads; ``failing`` ones raise."""

    def __init__(self, tries: dict[int, int], failing: frozenset[int] = frozenset()) -> None:
        self.tries = dict(tries)
        self.failing = failing

    def read(self, offset: int, view: memoryview) -> bool:
        if offset in self.failing:
            raise OSError(5, "I/O error")
        left = self.tries.get(offset, 0)
        if left:
            self.tries[offset] = left - 1
            return False
        view[:] = bytes([offset % 251]) * len(view)
        return True


def _read(handle: int, offset: int) -> tuple[ev.Request, bytearray, memoryview]:
    buf = bytearray(16 + 8)
    return ev.Request(handle, int(Cmd.READ), 0, offset, 8), buf, memoryview(buf)[16:]


def test_reads_are_answered_when_their_pages_come() -> None:
    waits = PageInWaits(Pages({100: 2, 200: 0}).read)
    for h, off in ((1, 100), (2, 200)):
        assert waits.take(*_read(h, off), now=0.0)
    done, late = waits.poll(0.0001)
    assert [w.req.handle for w in done] == [2]
    assert late == []
    assert done[0].buf[16:] == bytes([200 % 251]) * 8
    done, late = waits.poll(0.0002)
    assert done == []
    assert late == []
    assert len(waits.pending) == 1
    done, late = waits.poll(0.0003)
    assert [w.req.handle for w in done] == [1]
    assert waits.pending == []


def test_a_read_that_takes_too_long_is_handed_on() -> None:
    waits = PageInWaits(Pages({100: 1000}).read)
    waits.take(*_read(1, 100), now=0.0)
    assert waits.poll(waits.spin / 2) == ([], [])
    done, late = waits.poll(waits.spin)
    assert done == []
    assert [r.handle for r in late] == [1]
    assert waits.pending == []


def test_a_read_error_is_handed_on_at_once() -> None:
    waits = PageInWaits(Pages({}, failing=frozenset({300})).read)
    waits.take(*_read(7, 300), now=0.0)
    done, late = waits.poll(0.0)
    assert done == []
    assert [r.handle for r in late] == [7]


def test_late_reads_in_a_row_pause_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pagein, "PAGE_IN_TRIPS", 3)
    monkeypatch.setattr(pagein, "PAGE_IN_PAUSE", 10.0)
    pages = Pages(dict.fromkeys(range(0, 4096, 512), 1000))
    waits = PageInWaits(pages.read)
    # two late, then one answered: the count starts again
    for h in (1, 2):
        waits.take(*_read(h, h * 512), now=0.0)
    assert len(waits.poll(1.0)[1]) == 2
    pages.tries[3 * 512] = 0
    waits.take(*_read(3, 3 * 512), now=1.0)
    assert len(waits.poll(1.0)[0]) == 1
    # three late in a row: no more waiting for PAGE_IN_PAUSE
    for h in (4, 5, 6):
        waits.take(*_read(h, h * 512), now=2.0)
    assert len(waits.poll(3.0)[1]) == 3
    assert not waits.take(*_read(7, 0), now=3.0)
    assert not waits.take(*_read(7, 0), now=12.9)
    assert waits.take(*_read(7, 0), now=13.0)


def test_a_connection_waits_for_a_bounded_number_of_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pagein, "PAGE_IN_LIMIT", 4)
    waits = PageInWaits(Pages({}).read)
    assert all(waits.take(*_read(h, 0), now=0.0) for h in range(4))
    assert not waits.take(*_read(5, 0), now=0.0)
    waits.poll(0.0)
    assert waits.take(*_read(5, 0), now=0.0)
