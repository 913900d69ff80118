"""Pure helpers over extent lists: clip, merge, compose, convert for NBD."""

from __future__ import annotations

from collections.abc import Iterable

from nbdserve.block.base import ChainExtent


def merge_chain_extents(extents: Iterable[ChainExtent]) -> list[ChainExtent]:
    """Merge adjacent extents with identical flags and depth."""
    out: list[ChainExtent] = []
    for e in extents:
        if out:
            last = out[-1]
            if (
                last.end == e.offset
                and last.zero == e.zero
                and last.data == e.data
                and last.depth == e.depth
            ):
                out[-1] = ChainExtent(last.offset, last.length + e.length, e.zero, e.data, e.depth)
                continue
        out.append(e)
    return out


def clip_chain_extents(extents: Iterable[ChainExtent], start: int, end: int) -> list[ChainExtent]:
    """Clip to [start, end), dropping what falls outside."""
    out: list[ChainExtent] = []
    for e in extents:
        lo = max(e.offset, start)
        hi = min(e.end, end)
        if hi > lo:
            out.append(ChainExtent(lo, hi - lo, e.zero, e.data, e.depth))
    return out


def allocation_descriptors(extents: Iterable[ChainExtent]) -> list[tuple[int, int]]:
    """(length, flags) for ``base:allocation``: HOLE=1 unless data, ZERO=2."""
    out: list[tuple[int, int]] = []
    for e in extents:
        flags = (0 if e.data else 1) | (2 if e.zero else 0)
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + e.length, flags)
        else:
            out.append((e.length, flags))
    return out


def depth_descriptors(extents: Iterable[ChainExtent]) -> list[tuple[int, int]]:
    """(length, depth) for ``qemu:allocation-depth``."""
    out: list[tuple[int, int]] = []
    for e in extents:
        if out and out[-1][1] == e.depth:
            out[-1] = (out[-1][0] + e.length, e.depth)
        else:
            out.append((e.length, e.depth))
    return out
