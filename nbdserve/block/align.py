"""Pure alignment helpers (no I/O)."""

from __future__ import annotations


def align_down(value: int, alignment: int) -> int:
    return value - (value % alignment)


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def is_aligned(value: int, alignment: int) -> bool:
    return value % alignment == 0


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def split_aligned(offset: int, length: int, alignment: int) -> tuple[int, int, int]:
    """Split [offset, offset+length) into (head, body, tail) byte counts.

    ``head`` runs to the first aligned boundary, ``body`` is whole aligned
    units, ``tail`` is what remains.  When the whole range fits within one
    unit without touching a boundary, everything is ``head``.
    """
    end = offset + length
    first = align_up(offset, alignment)
    last = align_down(end, alignment)
    if first >= last:
        return length, 0, 0
    return first - offset, last - first, end - last
