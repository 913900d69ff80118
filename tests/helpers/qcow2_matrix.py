"""The qcow2 image matrix: images made by qemu-img/qemu-io covering the format's features.

Each builder writes into a directory and returns the top image path.  Sizes
are small (a few MiB) so the whole matrix is made in about a second.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.helpers.images import qemu_img, qemu_io

MiB = 1024 * 1024

# a spread of writes: cluster-aligned, unaligned, crossing clusters and L2 spans
_WRITES = [
    "write -P 0x11 0 64k",
    "write -P 0x22 72k 4k",
    "write -P 0x33 200k 10k",
    "write -P 0x44 1020k 8k",
    "write -P 0x55 3m 256k",
    "write -P 0x66 4095k 1k",
]
_ZEROS = ["write -z 128k 64k", "write -z 204k 4k", "write -z 3200k 64k"]


def _qcow2(d: Path, name: str, opts: str, size: str = "4M", *extra: str) -> Path:
    path = d / name
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, *extra, path, size, cwd=d)
    return path


def _populate(path: Path, zeros: bool = True) -> Path:
    qemu_io(path, *_WRITES, *(_ZEROS if zeros else []))
    return path


def plain_512(d: Path) -> Path:
    return _populate(_qcow2(d, "c512.qcow2", "cluster_size=512"))


def plain_64k(d: Path) -> Path:
    return _populate(_qcow2(d, "c64k.qcow2", "cluster_size=65536"))


def plain_2m(d: Path) -> Path:
    return _populate(_qcow2(d, "c2m.qcow2", "cluster_size=2M", "8M"))


def compat_010(d: Path) -> Path:
    return _populate(_qcow2(d, "v2.qcow2", "compat=0.10"), zeros=False)


def extended_l2(d: Path) -> Path:
    return _populate(_qcow2(d, "extl2.qcow2", "extended_l2=on,cluster_size=64k"))


def refcount_1bit(d: Path) -> Path:
    return _populate(_qcow2(d, "rc1.qcow2", "refcount_bits=1,cluster_size=4k"))


def zero_alloc(d: Path) -> Path:
    """Allocated clusters later zeroed without unmap (ZERO_ALLOC) and with unmap."""
    path = _populate(_qcow2(d, "zalloc.qcow2", "cluster_size=65536"))
    qemu_io(path, "write -P 0x77 1m 512k", "write -z 1m 128k", "write -z -u 1280k 64k")
    return path


def _compressed(d: Path, name: str, ctype: str) -> Path:
    src = _populate(_qcow2(d, f"src-{name}", "cluster_size=65536"))
    # incompressible-ish data too: a pattern qemu-io cannot compress much
    out = d / name
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", src, out)
    qemu_io(out, "write -P 0x99 2m 4k")  # one normal cluster among compressed ones
    return out


def compressed_zlib(d: Path) -> Path:
    return _compressed(d, "zlib.qcow2", "zlib")


def compressed_zstd(d: Path) -> Path:
    return _compressed(d, "zstd.qcow2", "zstd")


def data_file(d: Path) -> Path:
    # absolute: qemu 7.2 resolves a relative data file name against its cwd
    return _populate(_qcow2(d, "df.qcow2", f"data_file={d / 'df.data'}"))


def data_file_raw(d: Path) -> Path:
    return _populate(_qcow2(d, "dfraw.qcow2", f"data_file={d / 'dfraw.data'},data_file_raw=on"))


def prealloc_metadata(d: Path) -> Path:
    path = _qcow2(d, "prealloc.qcow2", "preallocation=metadata,cluster_size=65536")
    qemu_io(path, "write -P 0x12 100k 50k")
    return path


def snapshot(d: Path) -> Path:
    path = _populate(_qcow2(d, "snap.qcow2", "cluster_size=65536"))
    qemu_img("snapshot", "-c", "snap1", path)
    qemu_io(path, "write -P 0xaa 32k 64k", "write -z 3m 64k", "write -P 0xbb 2m 8k")
    return path


def chain3(d: Path) -> Path:
    """raw base <- qcow2 mid <- qcow2 top, with zeros in the top hiding lower data."""
    base = d / "base.raw"
    qemu_img("create", "-q", "-f", "raw", base, "4M")
    qemu_io(base, "write -P 0xb1 0 1m", "write -P 0xb2 2m 512k", fmt="raw")
    mid = d / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid)
    qemu_io(mid, "write -P 0xc1 512k 100k", "write -z 2m 64k", "write -P 0xc2 3m 4k")
    top = d / "top.qcow2"
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        top,
    )
    qemu_io(top, "write -P 0xd1 4k 4k", "write -z 600k 8k", "write -P 0xd2 2100k 3k")
    return top


def extl2_overlay_snapshot(d: Path) -> Path:
    """Extended L2 overlay (32k clusters) over a qcow2 base, with an internal snapshot:
    writes must copy allocated subclusters out of clusters shared with the snapshot."""
    base = d / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 0xab 0 4M")
    top = d / "xtop.qcow2"
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=32k",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top,
    )
    qemu_io(top, "write -P 1 0 100k", "write -P 2 200k 3k", "write -z 300k 10k")
    qemu_img("snapshot", "-c", "snap1", top)
    qemu_io(top, "write -P 3 16k 2k", "write -z -u 1m 64k")
    return top


MATRIX: dict[str, Callable[[Path], Path]] = {
    "extl2_overlay_snapshot": extl2_overlay_snapshot,
    "c512": plain_512,
    "c64k": plain_64k,
    "c2m": plain_2m,
    "compat010": compat_010,
    "extl2": extended_l2,
    "rc1": refcount_1bit,
    "zero_alloc": zero_alloc,
    "zlib": compressed_zlib,
    "zstd": compressed_zstd,
    "data_file": data_file,
    "data_file_raw": data_file_raw,
    "prealloc": prealloc_metadata,
    "snapshot": snapshot,
    "chain3": chain3,
}


def build_all(d: Path) -> dict[str, Path]:
    out = {}
    for name, build in MATRIX.items():
        sub = d / name
        sub.mkdir()
        out[name] = build(sub)
    return out
