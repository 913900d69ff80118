"""Hypothesis model test: random operations on qcow2 images against a bytearray.

Offsets are biased toward cluster and L2-table boundaries.  After every
example the image is read back through the driver, converted by qemu-img and
checked by qemu-img check.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserve.block.chain import ChainOptions, open_chain
from nbdserve.block.device import BlockDevice
from nbdserve.block.qcow2 import create_image
from tests.conftest import require_tools
from tests.helpers.images import assert_clean, qemu_img, qemu_io, to_raw

pytestmark = pytest.mark.interop

SIZE = 256 * 1024

CONFIGS = {
    # 512-byte clusters: an L2 table maps 32 KiB, so ops cross many of them
    "c512": ({"cluster_size": "512"}, False),
    "extl2": ({"cluster_size": "16K", "extended_l2": "on"}, False),
    "c512-backing": ({"cluster_size": "512"}, True),
    "v2-4k": ({"cluster_size": "4K", "compat": "0.10"}, False),
}


def _offsets(cluster: int) -> st.SearchStrategy[int]:
    boundary = st.sampled_from([cluster, cluster * 64, 32 * 1024, 16 * 1024 * 1024])
    near = st.tuples(st.integers(0, SIZE // cluster), st.integers(-2, 2)).map(
        lambda t: t[0] * cluster + t[1] * 512
    )
    aligned = st.tuples(boundary, st.integers(0, 64)).map(lambda t: t[0] * t[1])
    raw = st.integers(0, SIZE - 1)
    return st.one_of(near, aligned, raw).map(lambda o: min(max(o, 0), SIZE - 1))


def _ops(cluster: int) -> st.SearchStrategy[list[tuple[str, int, int, int]]]:
    length = st.one_of(st.integers(1, 3 * cluster + 700), st.sampled_from([cluster, 2 * cluster]))
    op = st.tuples(
        st.sampled_from(["write", "write", "zero", "zero_unmap", "discard", "flush", "reopen"]),
        _offsets(cluster),
        length,
        st.integers(1, 255),
    )
    return st.lists(op, min_size=1, max_size=25)


async def _run_case(name: str, ops: list[tuple[str, int, int, int]]) -> None:
    opts, with_backing = CONFIGS[name]
    cluster = int(opts["cluster_size"].rstrip("K")) * (1024 if "K" in opts["cluster_size"] else 1)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "img.qcow2"
        model = bytearray(SIZE)
        backing = None
        if with_backing:
            qemu_img("create", "-q", "-f", "qcow2", Path(d) / "base.qcow2", str(SIZE))
            qemu_io(Path(d) / "base.qcow2", f"write -P 0xab 0 {SIZE}")
            model[:] = b"\xab" * SIZE
            backing = "base.qcow2"
        await create_image(str(path), SIZE, dict(opts), backing, "qcow2" if backing else None)
        chain = await open_chain(str(path), ChainOptions(read_only=False))
        try:
            dev = BlockDevice(chain.top)
            for kind, off, ln, fill in ops:
                ln = min(ln, SIZE - off)
                if kind == "write":
                    await dev.write(off, bytes([fill]) * ln)
                    model[off : off + ln] = bytes([fill]) * ln
                elif kind.startswith("zero"):
                    await dev.write_zeroes(off, ln, may_unmap=kind == "zero_unmap")
                    model[off : off + ln] = bytes(ln)
                elif kind == "discard":
                    await dev.discard(off, ln)
                    lo, hi = -(-off // cluster) * cluster, (off + ln) // cluster * cluster
                    if hi > lo:  # contents unspecified: adopt what the image shows now
                        model[lo:hi] = await dev.read(lo, hi - lo)
                elif kind == "flush":
                    await dev.flush()
                else:
                    await chain.aclose()
                    chain = await open_chain(str(path), ChainOptions(read_only=False))
                    dev = BlockDevice(chain.top)
            assert await dev.read(0, SIZE) == bytes(model)
        finally:
            await chain.aclose()
        assert_clean(path)
        assert to_raw(path, Path(d) / "out.raw") == bytes(model)


def _make_test(name: str, examples: int = 12):  # type: ignore[no-untyped-def]
    cluster = 512 if "512" in name else (16384 if name == "extl2" else 4096)

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ops=_ops(cluster))
    async def test(ops: list[tuple[str, int, int, int]]) -> None:
        require_tools("qemu-img", "qemu-io")
        await _run_case(name, ops)

    test.__name__ = f"test_model_{name.replace('-', '_')}"
    return test


test_model_c512 = _make_test("c512")
test_model_extl2 = _make_test("extl2")
test_model_c512_backing = _make_test("c512-backing")
test_model_v2_4k = _make_test("v2-4k")


# soak variants: 300 examples per configuration (only with --run-slow)
test_model_soak_c512 = pytest.mark.slow(_make_test("c512", 300))
test_model_soak_extl2 = pytest.mark.slow(_make_test("extl2", 300))
test_model_soak_c512_backing = pytest.mark.slow(_make_test("c512-backing", 300))
test_model_soak_v2_4k = pytest.mark.slow(_make_test("v2-4k", 300))
