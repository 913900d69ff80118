"""PagedTable against a dense numpy model: lookups, runs, updates, write-back, load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdserve.block.file import FileBackend
from nbdserve.block.pagedtable import PAGE_BYTES, PagedTable

FILL32 = 0xFFFFFFFF
PER_PAGE = PAGE_BYTES // 4


def naive_next_not(dense: np.ndarray, first: int, stop: int, value: int) -> int:
    for i in range(first, min(stop, len(dense))):
        if int(dense[i]) != value:
            return i
    return min(stop, len(dense))


def naive_run(dense: np.ndarray, first: int, stop: int, fill: int, step: int) -> int:
    stop = min(stop, len(dense))
    head = int(dense[first])
    n = 1
    while first + n < stop:
        v = int(dense[first + n])
        if head == fill:
            if v != fill:
                break
        elif v != head + n * step:
            break
        n += 1
    return n


# a few pages, entries biased towards fill and short contiguous runs
ops_st = st.lists(
    st.tuples(st.integers(0, 3 * PER_PAGE + 10), st.integers(1, 40), st.sampled_from([0, 5, 100])),
    max_size=12,
)


@pytest.mark.parametrize("fill", [0, FILL32])
@given(ops=ops_st, probe=st.integers(0, 3 * PER_PAGE + 10), data=st.data())
def test_matches_a_dense_model(
    fill: int, ops: list[tuple[int, int, int]], probe: int, data: st.DataObject
) -> None:
    count = 3 * PER_PAGE + 11  # a partial last page
    table = PagedTable(count, "<u4", fill)
    dense = np.full(count, fill, dtype="<u4")
    for first, n, base in ops:
        n = min(n, count - first)
        if base == 100:  # clear back to fill
            table.fill_range(first, first + n, fill)
            dense[first : first + n] = fill
        else:
            values = (base + np.arange(n)).astype("<u4")
            table.set_range(first, values)
            dense[first : first + n] = values
    assert table.dense().tolist() == dense.tolist()
    assert table.get(probe) == int(dense[probe])
    stop = data.draw(st.integers(probe + 1, count + 5))
    assert table.next_non_fill(probe, stop) == naive_next_not(dense, probe, stop, fill)
    assert table.next_not(probe, stop, 5) == naive_next_not(dense, probe, stop, 5)
    assert table.run_length(probe, stop, 1) == naive_run(dense, probe, stop, fill, 1)
    n = data.draw(st.integers(0, count - probe))
    assert table.window(probe, n).tolist() == dense[probe : probe + n].tolist()
    index, values = table.items()
    nz = np.flatnonzero(dense != fill)
    assert index.tolist() == nz.tolist()
    assert values.tolist() == dense[nz].tolist()
    # the table started as all fill: writing back its dirty pages gives the model's bytes
    image = bytearray(np.full(count, fill, dtype="<u4").tobytes())
    for off, chunk in table.take_dirty():
        image[off : off + len(chunk)] = chunk
    assert bytes(image) == dense.tobytes()
    assert not table.has_dirty()
    again = PagedTable.from_bytes(bytes(image), count, "<u4", fill)
    assert again.dense().tolist() == dense.tolist()


def test_fill_pages_are_not_stored() -> None:
    count = 64 * PER_PAGE
    table = PagedTable(count, "<u4", FILL32)
    table.set(5 * PER_PAGE + 3, 7)
    assert table.pages_present == 1
    assert table.memory_bytes == PAGE_BYTES
    table.fill_range(0, count, FILL32)  # clearing absent pages stores nothing
    assert table.pages_present == 1
    assert table.next_non_fill(0, count) == count
    # one absent stretch costs no per-entry scanning
    assert table.entries_scanned <= PER_PAGE


async def test_load_skips_holes_and_fill_pages(tmp_path: Path) -> None:
    count = 256 * PER_PAGE  # 1 MiB of entries
    path = tmp_path / "t"
    offset = 64
    dense = np.zeros(count, dtype="<u4")
    dense[[3, 100 * PER_PAGE + 1, count - 1]] = [1, 2, 3]
    path.write_bytes(bytes(offset) + dense.tobytes())
    # punch a hole in the middle: it must not be read (where the filesystem can tell)
    file = FileBackend.open(str(path), read_only=False)
    try:
        await file.punch_hole(1 << 19, 1 << 18)
        table = await PagedTable.load(file, offset, count, "<u4", 0)
        assert table.pages_present == 3
        assert table.dense().tolist() == dense.tolist()
        if any(not is_data for _, _, is_data in file.data_extents(offset, 4 * count)):
            assert table.bytes_read < 4 * count
        full = await PagedTable.load(file, offset, count, "<u4", FILL32)
        assert full.bytes_read == 4 * count  # a non-zero fill cannot skip holes
    finally:
        await file.aclose()
