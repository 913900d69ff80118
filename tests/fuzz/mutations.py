"""Mutations of seed images: JSON-able descriptions, their application, hypothesis strategies.

A mutation is a dict (so a corpus entry is plain JSON):

* ``{"op": "field", "name": N, "value": V}`` -- header field N := V
* ``{"op": "entry", "table": T, "index": I, "value": V}`` -- table entry := V
* ``{"op": "flip", "region": R, "offset": O, "bit": B}`` -- flip one bit
* ``{"op": "byte", "region": R, "offset": O, "value": V}`` -- set one byte
* ``{"op": "truncate", "length": L}`` / ``{"op": "extend", "length": L, "fill": F}``

Indexes and offsets are taken modulo the table/region size of the seed, and
values are truncated to the field's width, so every drawn description applies.
Values are biased toward boundaries: 0, powers of two and their neighbours,
the file size, the original value nudged, flag bits set, and values copied
from other entries (double mappings).
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from tests.fuzz.layouts import Layout
from tests.fuzz.seeds import Seed

Mutation = dict[str, Any]

_CONSTANTS = [
    0, 1, 2, 3, 4, 7, 8, 9, 12, 16, 31, 32, 63, 64, 255, 256, 511, 512, 513,
    4095, 4096, 4097, 0xFFFF, 0x10000, 0x10001, 1 << 20, (1 << 21) + 512, 1 << 30,
    (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 32) + 1, 1 << 40, 1 << 48,
    1 << 55, 1 << 56, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1,
    # record and magic values the parsers look for
    0x3F2AB8ED, 0xB4E6F7AC, 0x5143F5A9, 0x746F6E59, 0xAB234CEF23DCEA87,
    0x8000000000000000 | 0x200, 0x4000000000000000 | 0x1000,
]  # fmt: skip


def interesting_values(width: int, original: int, file_size: int) -> list[int]:
    """Boundary values for a ``width``-byte integer field."""
    top = 1 << (8 * width)
    derived = [
        file_size - 1, file_size, file_size + 1, file_size & ~511, file_size + 512,
        original - 1, original + 1, original ^ 1, original * 2, original // 2,
        original + 512, original + 4096, original + 65536, original - 4096,
        original | (1 << 63), original | (1 << 62), original | 1, original & ~1,
        original << 8, original >> 8, top - 1, top // 2, top // 2 - 1,
    ]  # fmt: skip
    return sorted({v % top for v in _CONSTANTS + derived if v >= 0})


def apply(seed: Seed, mutations: list[Mutation]) -> bytes:
    """The seed's bytes with ``mutations`` applied in order."""
    data = bytearray(seed.data)
    for m in mutations:
        _apply_one(data, seed.layout, m)
    return bytes(data)


def _apply_one(data: bytearray, layout: Layout, m: Mutation) -> None:
    op = m["op"]
    if op == "field":
        f = layout.fields[m["name"]]
        _store(data, f.offset, f.size, f.endian, m["value"])
    elif op == "entry":
        t = layout.tables[m["table"]]
        e = t.entry(m["index"] % t.count)
        _store(data, e.offset, e.size, e.endian, m["value"])
    elif op in ("flip", "byte"):
        start, length = layout.regions[m["region"]]
        pos = start + m["offset"] % max(1, length)
        if pos >= len(data):
            return
        if op == "flip":
            data[pos] ^= 1 << (m["bit"] % 8)
        else:
            data[pos] = m["value"] & 0xFF
    elif op == "truncate":
        del data[m["length"] % max(1, len(data)) :]
    elif op == "extend":
        data.extend(bytes([m.get("fill", 0) & 0xFF]) * m["length"])
    else:
        raise ValueError(f"unknown mutation {m!r}")


def _store(data: bytearray, offset: int, size: int, endian: str, value: int) -> None:
    if offset + size > len(data):
        return
    value %= 1 << (8 * size)
    data[offset : offset + size] = value.to_bytes(size, "little" if endian == "<" else "big")


# ---- strategies -------------------------------------------------------------


def _value_for(
    width: int, original: int, file_size: int, extra: list[int]
) -> st.SearchStrategy[int]:
    choices = interesting_values(width, original, file_size)
    parts = [st.sampled_from(choices), st.integers(0, (1 << (8 * width)) - 1)]
    if extra:
        parts.append(st.sampled_from(extra))
    return st.one_of(*parts)


@st.composite
def _field_mutation(draw: st.DrawFn, seed: Seed) -> Mutation:
    name = draw(st.sampled_from(sorted(seed.layout.fields)))
    f = seed.layout.fields[name]
    value = draw(_value_for(f.size, f.read(seed.data), len(seed.data), []))
    return {"op": "field", "name": name, "value": value}


def _used_entries(seed: Seed) -> dict[str, tuple[list[int], list[int]]]:
    """Per table: indexes of non-zero entries (what reads follow) and their values."""
    out = {}
    for name, t in seed.layout.tables.items():
        used = [i for i in range(min(t.count, 4096)) if t.entry(i).read(seed.data)]
        out[name] = (used, sorted({t.entry(i).read(seed.data) for i in used[:64]}))
    return out


@st.composite
def _entry_mutation(
    draw: st.DrawFn, seed: Seed, used: dict[str, tuple[list[int], list[int]]]
) -> Mutation:
    name = draw(st.sampled_from(sorted(seed.layout.tables)))
    t = seed.layout.tables[name]
    in_use, values = used[name]
    any_index = st.integers(0, t.count - 1)
    index = draw(st.one_of(st.sampled_from(in_use), any_index) if in_use else any_index)
    original = t.entry(index).read(seed.data)
    value = draw(_value_for(t.entry_size, original, len(seed.data), values))
    return {"op": "entry", "table": name, "index": index, "value": value}


@st.composite
def _flip_mutation(draw: st.DrawFn, seed: Seed) -> Mutation:
    name = draw(st.sampled_from(sorted(seed.layout.regions)))
    length = seed.layout.regions[name][1]
    offset = draw(st.integers(0, max(0, length - 1)))
    if draw(st.booleans()):
        return {"op": "flip", "region": name, "offset": offset, "bit": draw(st.integers(0, 7))}
    return {"op": "byte", "region": name, "offset": offset, "value": draw(st.integers(0, 255))}


def _size_mutation(seed: Seed) -> st.SearchStrategy[Mutation]:
    n = len(seed.data)
    cuts = sorted(c for c in {0, 1, 64, 512, 4096, n // 2, n - 1, n - 512} if 0 <= c < n) or [0]
    return st.one_of(
        st.builds(
            lambda length: {"op": "truncate", "length": length},
            st.one_of(st.sampled_from(cuts), st.integers(0, max(0, n - 1))),
        ),
        st.builds(
            lambda length, fill: {"op": "extend", "length": length, "fill": fill},
            st.sampled_from([1, 511, 4096, 65536]),
            st.sampled_from([0, 0xFF]),
        ),
    )


def mutation(seed: Seed) -> st.SearchStrategy[Mutation]:
    """One mutation; field and table edits are weighted over blind flips."""
    parts: list[st.SearchStrategy[Mutation]] = []
    if seed.layout.fields:
        parts += [_field_mutation(seed)] * 3
    if seed.layout.tables:
        parts += [_entry_mutation(seed, _used_entries(seed))] * 3
    parts += [_flip_mutation(seed)] * 2
    parts.append(_size_mutation(seed))
    return st.one_of(*parts)


_STRATEGIES: dict[tuple[str, int], st.SearchStrategy[list[Mutation]]] = {}


def mutations(seed: Seed, max_size: int = 4) -> st.SearchStrategy[list[Mutation]]:
    """1..max_size mutations of ``seed`` (built once per seed: drawing is the hot path)."""
    key = (seed.name, max_size)
    if key not in _STRATEGIES:
        _STRATEGIES[key] = st.lists(mutation(seed), min_size=1, max_size=max_size)
    return _STRATEGIES[key]
