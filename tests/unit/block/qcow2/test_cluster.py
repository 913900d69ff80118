"""Pure mapping arithmetic: classify + units_to_runs against a per-unit reference."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from nbdserve.block.qcow2.cluster import (
    Geometry,
    RunKind,
    classify,
    occupied_units,
    offset_into_cluster,
    offset_to_l1_index,
    offset_to_l2_index,
    units_to_runs,
)
from nbdserve.block.qcow2.structs import QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED

G = Geometry(cluster_bits=16, extended_l2=False, has_zero_flag=True)
GX = Geometry(cluster_bits=16, extended_l2=True, has_zero_flag=True)


@given(st.integers(0, 1 << 50))
def test_index_arithmetic_recomposes_the_offset(offset: int) -> None:
    back = (
        (offset_to_l1_index(G, offset) << G.l2_span_bits)
        + (offset_to_l2_index(G, offset) << G.cluster_bits)
        + offset_into_cluster(G, offset)
    )
    assert back == offset


def _entry_strategy() -> st.SearchStrategy[int]:
    host = st.integers(1, 1000).map(lambda c: c << 16)
    return st.one_of(
        st.just(0),
        st.just(1),  # zero plain
        host.map(lambda h: h | QCOW_OFLAG_COPIED),
        host.map(lambda h: h | 1),  # zero alloc
        st.integers(1, 1 << 40).map(lambda h: h | QCOW_OFLAG_COMPRESSED),
    )


def _reference_kind(entry: int) -> RunKind:
    if entry & QCOW_OFLAG_COMPRESSED:
        return RunKind.COMPRESSED
    host = entry & 0x00FFFFFFFFFFFE00
    if entry & 1:
        return RunKind.ZERO_ALLOC if host else RunKind.ZERO_PLAIN
    return RunKind.NORMAL if host else RunKind.UNALLOCATED


@given(st.lists(_entry_strategy(), min_size=1, max_size=40), st.data())
def test_runs_cover_units_and_agree_with_reference(entries: list[int], data: st.DataObject) -> None:
    # make some neighbours host-contiguous so merging is exercised
    table = np.array(entries, dtype=">u8")
    first = data.draw(st.integers(0, len(entries) - 1))
    count = data.draw(st.integers(1, len(entries) - first))
    kinds, hosts, raw = classify(G, table, first, count)
    runs = units_to_runs(G, kinds, hosts, raw, first << 16, first)
    pos = first << 16
    for run in runs:
        assert run.guest_offset == pos
        assert run.length > 0
        for u in range(run.length >> 16):
            e = entries[(pos >> 16) + u]
            assert _reference_kind(e) == run.kind
            if run.kind in (RunKind.NORMAL, RunKind.ZERO_ALLOC):
                assert (e & 0x00FFFFFFFFFFFE00) == run.host_offset + (u << 16)
            if run.kind == RunKind.COMPRESSED:
                assert run.length == 1 << 16
                assert run.l2_entry == e
        pos = run.end
    assert pos == (first + count) << 16


@given(st.lists(_entry_strategy(), min_size=1, max_size=40))
def test_status_runs_split_only_where_the_kind_changes(entries: list[int]) -> None:
    """For block status (hosts_matter=False) a run ends exactly where the kind of the
    next unit differs: scattered data is one run, not one per cluster."""
    table = np.array(entries, dtype=">u8")
    kinds, hosts, raw = classify(G, table, 0, len(entries))
    runs = units_to_runs(G, kinds, hosts, raw, 0, 0, hosts_matter=False)
    expected = [_reference_kind(entries[0])]
    for e in entries[1:]:
        if _reference_kind(e) != expected[-1]:
            expected.append(_reference_kind(e))
    assert [r.kind for r in runs] == expected
    assert sum(r.length for r in runs) == len(entries) << 16
    assert all(a.end == b.guest_offset for a, b in itertools.pairwise(runs))


def test_contiguous_hosts_merge_into_one_run() -> None:
    table = np.array([(5 + i) << 16 | QCOW_OFLAG_COPIED for i in range(8)], dtype=">u8")
    kinds, hosts, raw = classify(G, table, 0, 8)
    runs = units_to_runs(G, kinds, hosts, raw, 0, 0)
    assert len(runs) == 1
    assert runs[0].host_offset == 5 << 16
    assert runs[0].length == 8 << 16


@given(st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1))
def test_extended_l2_subclusters(alloc: int, zero: int) -> None:
    zero &= ~alloc  # both bits set is INVALID, tested below
    table = np.array([7 << 16 | QCOW_OFLAG_COPIED, alloc | (zero << 32)], dtype=">u8")
    kinds, hosts, _raw = classify(GX, table, 0, 32)
    for j in range(32):
        if alloc >> j & 1:
            assert kinds[j] == RunKind.NORMAL
            assert int(hosts[j]) == (7 << 16) + (j << 11)
        elif zero >> j & 1:
            assert kinds[j] == RunKind.ZERO_ALLOC
        else:
            assert kinds[j] == RunKind.UNALLOCATED


def test_extended_l2_both_bits_is_invalid_and_misaligned_is_flagged() -> None:
    table = np.array([7 << 16, 1 | (1 << 32)], dtype=">u8")
    kinds, _, _ = classify(GX, table, 0, 2)
    assert kinds[0] == RunKind.INVALID
    table = np.array([(7 << 16) + 512 | QCOW_OFLAG_COPIED], dtype=">u8")
    kinds, _, _ = classify(G, table, 0, 1)
    assert kinds[0] == RunKind.MISALIGNED


@given(
    st.lists(st.one_of(st.just(0), _entry_strategy()), min_size=1, max_size=64),
    st.booleans(),
    st.data(),
)
def test_occupied_units_bound_every_unit_that_is_not_unallocated_by_zero_words(
    words: list[int], extended: bool, data: st.DataObject
) -> None:
    """The mapping classifies only [lo, hi): every unit outside it must have all-zero
    L2 words (unallocated in every variant), and lo/hi themselves must not."""
    g = GX if extended else G
    if extended and len(words) % 2:
        words.append(0)
    table = np.array(words, dtype=">u8")
    units = (len(words) // 2) * 32 if extended else len(words)
    first = data.draw(st.integers(0, units - 1))
    stop = data.draw(st.integers(first + 1, units))

    def unit_words_zero(u: int) -> bool:
        if extended:
            c = u >> 5
            return words[2 * c] == 0 and words[2 * c + 1] == 0
        return words[u] == 0

    got = occupied_units(g, table, first, stop)
    nonzero = [u for u in range(first, stop) if not unit_words_zero(u)]
    if not nonzero:
        assert got is None
        return
    assert got is not None
    lo, hi = got
    assert first <= lo < hi <= stop
    if extended:  # whole clusters, clipped to the range
        assert lo == max(first, nonzero[0] >> 5 << 5)
        assert hi == min(stop, ((nonzero[-1] >> 5) + 1) << 5)
    else:
        assert (lo, hi) == (nonzero[0], nonzero[-1] + 1)
