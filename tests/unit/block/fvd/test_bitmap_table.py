"""Bitmap and table arithmetic against naive per-bit references."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nbdserve.block.fvd.bitmap import Bitmap
from nbdserve.block.fvd.journal import PendingRecords, pack_sectors
from nbdserve.block.fvd.structs import JournalBitmapRecord, JournalRecord, JournalTableRecord
from nbdserve.block.fvd.table import ChunkTable


@given(
    count=st.integers(1, 300),
    sets=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)), max_size=10),
    query=st.tuples(st.integers(0, 320), st.integers(0, 320)),
)
def test_bitmap_matches_naive(
    count: int, sets: list[tuple[int, int]], query: tuple[int, int]
) -> None:
    bm = Bitmap(count)
    naive = [False] * count
    for first, n in sets:
        bm.set_range(first, first + n)
        for i in range(first, min(first + n, count)):
            naive[i] = True
    assert [bm.is_set(i) for i in range(count)] == naive
    assert bm.count_set() == sum(naive)
    assert bm.stray_bits() == 0
    lo, hi = sorted(query)
    expect = [naive[i] if i < count else True for i in range(lo, hi)]
    assert bm.all_set(lo, hi) == all(expect)
    runs = bm.runs(lo, hi)
    flat = [bit for a, b, bit in runs for _ in range(a, b)]
    assert flat == expect
    assert all(runs[i][2] != runs[i + 1][2] for i in range(len(runs) - 1))
    clear = [i for i in range(lo, count) if not naive[i]]
    assert bm.first_clear(lo) == (clear[0] if clear else None)
    assert Bitmap(count, bm.snapshot()).snapshot() == bm.snapshot()


@given(st.lists(st.integers(0, 15), max_size=16))
def test_table_allocator_reuses_leaks_first(entries: list[int]) -> None:
    values = [e if e < 8 else 0xFFFFFFFF for e in entries]
    unique = []
    for v in values:
        unique.append(0xFFFFFFFF if v in unique else v)
    table = ChunkTable(16)
    table.set_entries(0, unique)
    table.check_entries()
    table.start_allocator()
    used = {v for v in unique if v != 0xFFFFFFFF}
    top = max(used) + 1 if used else 0
    leaked = sorted(set(range(top)) - used)
    assert table.leaked() == leaked
    got = [table.reserve() for _ in range(len(leaked) + 2)]
    assert [p for p, _ in got] == [*leaked, top, top + 1]
    assert [reused for _, reused in got] == [True] * len(leaked) + [False, False]


def test_pending_records_merge_and_pack() -> None:
    pending = PendingRecords()
    pending.add_bitmap(0, 65536)
    pending.add_bitmap(65536, 65536)
    pending.add_table(2, 5, 9)
    pending.add_table(2, 6, 10)
    pending.add_table(3, 7, 11)  # another epoch: a new record
    records = pending.take()
    assert records == [
        JournalBitmapRecord(0, 131072),
        JournalTableRecord(2, 5, (9, 10)),
        JournalTableRecord(3, 7, (11,)),
    ]
    assert len(pending) == 0
    many: list[JournalRecord] = [
        JournalTableRecord(1, i * 100, tuple(range(100))) for i in range(3)
    ]
    sectors = pack_sectors(many, [])
    assert [len(s) for s in sectors] == [1, 1, 1]  # 420 bytes each: one per sector
