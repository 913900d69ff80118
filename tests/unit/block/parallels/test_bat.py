from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from nbdserve.block.pagedtable import PAGE_BYTES
from nbdserve.block.parallels.bat import BatTable, duplicate_indices
from nbdserve.block.parallels.structs import HEADER_SIZE, Geometry

CS = 4096


def table(entries: list[int], unit: int = CS) -> BatTable:
    g = Geometry(
        cluster_size=CS,
        bat_unit=unit,
        bat_entries=len(entries),
        size=len(entries) * CS,
        data_start=8 * CS,
        data_off_ok=True,
        ext_offset=0,
    )
    return BatTable.from_entries(g, entries)


def naive_run(entries: list[int], first: int, count: int, unit: int) -> tuple[int, int]:
    count = min(count, len(entries) - first)
    if entries[first] == 0:
        n = 1
        while n < count and entries[first + n] == 0:
            n += 1
        return 0, n
    n = 1
    while n < count and entries[first + n] == entries[first] + n * (CS // unit):
        n += 1
    return entries[first] * unit, n


entries_st = st.lists(st.sampled_from([0, 0, 8, 9, 10, 11, 20, 21]), min_size=1, max_size=40)


@given(entries_st, st.data())
def test_run_at_matches_naive(entries: list[int], data: st.DataObject) -> None:
    first = data.draw(st.integers(0, len(entries) - 1))
    count = data.draw(st.integers(1, len(entries) - first))
    for unit in (CS, 512):
        scaled = [e * (CS // unit) for e in entries]
        assert table(scaled, unit).run_at(first, count) == naive_run(scaled, first, count, unit)


@given(entries_st)
def test_allocation_runs_cover_and_alternate(entries: list[int]) -> None:
    runs = table(entries).allocation_runs(0, len(entries))
    assert sum(n for _, n, _ in runs) == len(entries)
    pos = 0
    for start, n, allocated in runs:
        assert start == pos
        assert all((entries[i] != 0) == allocated for i in range(start, start + n))
        pos += n
    assert all(a[2] != b[2] for a, b in itertools.pairwise(runs))


def test_set_run_marks_pages_and_take_dirty_merges() -> None:
    per_page = PAGE_BYTES // 4
    n = 3 * per_page + per_page // 2  # the last page is partial
    t = table([0] * n)
    assert not t.has_dirty()
    assert t.table.pages_present == 0  # an empty BAT holds no pages
    t.set_run(10, 3, 100 * CS)
    assert [t.host_offset(i) for i in (10, 11, 12)] == [100 * CS, 101 * CS, 102 * CS]
    t.set_run(n - 1, 1, 7 * CS)
    chunks = t.take_dirty()
    # host offsets follow the header; the partial last page stops at the BAT's end
    assert [(off, len(data)) for off, data in chunks] == [
        (HEADER_SIZE, PAGE_BYTES),
        (HEADER_SIZE + 3 * PAGE_BYTES, 4 * n - 3 * PAGE_BYTES),
    ]
    assert not t.has_dirty()
    t.restore_dirty(chunks)
    assert t.take_dirty() == chunks
    # the bytes written back are what the entries say
    assert int.from_bytes(chunks[0][1][40:44], "little") == 100
    assert int.from_bytes(chunks[1][1][-4:], "little") == 7


def test_unallocated_runs_are_not_capped_by_the_scan_window() -> None:
    n = 1 << 20  # 4 MiB of BAT
    t = table([0] * n)
    t.set_run(n - 5, 1, 9 * CS)
    assert t.run_at(0, n) == (0, n - 5)
    assert t.allocation_runs(0, n) == [(0, n - 5, False), (n - 5, 1, True), (n - 4, 4, False)]
    # only the one stored page was looked at entry by entry
    assert t.table.entries_scanned < 4 * PAGE_BYTES


def test_duplicates_keep_the_first_occurrence() -> None:
    index = np.array([1, 4, 5, 9, 12])
    host = np.array([10, 20, 10, 30, 20], dtype=np.int64)
    assert duplicate_indices(index, host).tolist() == [5, 12]
    assert duplicate_indices(index[:1], host[:1]).tolist() == []


def test_problems_and_data_end() -> None:
    t = table([0, 8, 9, 2, 30, 9])
    p = t.problems(file_size=20 * CS)
    assert p.outside.tolist() == [4]
    assert p.inside_metadata.tolist() == [3]
    assert p.duplicates.tolist() == [5]
    assert "outside the file" in p.describe()
    assert t.data_end() == 31 * CS
    assert table([0, 0]).data_end() == 8 * CS
