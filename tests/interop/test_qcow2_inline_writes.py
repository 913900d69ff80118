"""qcow2: overwrites of allocated clusters are written inline, also across clusters.

Writes that span several clusters are answered without a task when every cluster
may be overwritten in place (allocated, L2 table cached, refcount 1); otherwise
they take the ordinary write path, which copies shared clusters first.  Which path
a write took is read from the device's counters (the ordinary path counts writes,
the inline one does not); whether it wrote the right bytes, from qemu-img compare
against a raw image given the same writes, and qemu-img check.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdserve.block.device import BlockDevice
from nbdserve.server.serve import ServerHandle
from tests.conftest import require_tools
from tests.helpers.images import assert_clean, qemu_img, qemu_io
from tests.helpers.server import export, run, running_server, uri

pytestmark = pytest.mark.interop

MiB = 1 << 20
FIRST = "write -P 0x11 0 4M"
# unaligned and cluster-straddling; 1 MiB (16 clusters); a cluster and a bit
OVERWRITES = ["write -P 0x22 100000 300000", "write -P 0x33 1M 1M", "write -P 0x44 3149824 69632"]


def _images(tmp_path: Path) -> tuple[Path, Path]:
    img, ref = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", img, "8M")
    qemu_img("create", "-q", "-f", "raw", ref, "8M")
    # the qcow2 clusters in reverse order: a write spanning clusters then maps to
    # several places in the file, not one stretch
    qemu_io(img, *(f"write -P 0x11 {c * 64 * 1024} 64k" for c in reversed(range(64))))
    qemu_io(ref, FIRST, fmt="raw")
    return img, ref


def _device(srv: ServerHandle) -> BlockDevice:
    assert srv.registry is not None
    exp = srv.registry.lookup("d")
    assert exp is not None
    return exp.device


async def _overwrite(srv: ServerHandle) -> None:
    argv: list[str] = ["qemu-io", "-f", "raw", "-t", "writeback"]  # no FUA on each write
    for cmd in OVERWRITES:
        argv += ["-c", cmd]
    await run(*argv, uri(srv, "d"))


async def test_overwrites_across_clusters_are_inline_and_land(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    img, ref = _images(tmp_path)
    async with running_server(export(img, "d", format="qcow2")) as srv:
        device = _device(srv)
        await run("qemu-io", "-f", "raw", "-c", "read 0 4M", uri(srv, "d"))  # caches the L2 table
        before = device.stats.writes
        await _overwrite(srv)
        assert device.stats.writes == before, "an overwrite took the ordinary write path"
    qemu_io(ref, *OVERWRITES, fmt="raw")
    assert_clean(img)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", img, ref)


async def test_shared_clusters_are_copied_not_overwritten(tmp_path: Path) -> None:
    """After a snapshot every cluster has refcount 2: a write must not go inline,
    and the snapshot keeps the old bytes."""
    require_tools("qemu-img", "qemu-io")
    img, ref = _images(tmp_path)
    qemu_img("snapshot", "-c", "before", img)
    async with running_server(export(img, "d", format="qcow2")) as srv:
        device = _device(srv)
        await run("qemu-io", "-f", "raw", "-c", "read 0 4M", uri(srv, "d"))
        before = device.stats.writes
        await _overwrite(srv)
        assert device.stats.writes == before + len(OVERWRITES)
    qemu_io(ref, *OVERWRITES, fmt="raw")
    assert_clean(img)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", img, ref)
    old = tmp_path / "old.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", "-l", "snapshot.name=before", img, old)
    fresh = tmp_path / "fresh.raw"
    qemu_img("create", "-q", "-f", "raw", fresh, "8M")
    qemu_io(fresh, FIRST, fmt="raw")
    qemu_img("compare", "-f", "raw", "-F", "raw", old, fresh)
