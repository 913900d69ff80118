"""The ``-o`` options of ``nbdserve img create``, per format, for ``-o help``.

One table per format, in qemu-img's ``-o help`` style (name, type, one line,
default).  The parsers in each format's create code stay where they are;
``tests/unit/test_create_options.py`` derives the names each parser accepts
from that code and checks this table lists exactly those, so the help cannot
drift from what ``img create`` takes.
"""

from __future__ import annotations

from dataclasses import dataclass

from nbdserve.block.fvd.create import CreateOptions as _FvdDefaults
from nbdserve.block.parallels.structs import DEFAULT_CLUSTER_SIZE as _PARALLELS_CLUSTER
from nbdserve.errors import ConfigError


@dataclass(frozen=True, slots=True)
class CreateOption:
    name: str
    kind: str  # what qemu-img shows in <...>: size, bool, str, num, or choices
    help: str
    default: str | None = None  # None: no default (unset)


def _kib(n: int) -> str:
    return f"{n // 1024}k" if n % (1024 * 1024) else f"{n // (1024 * 1024)}M"


_FVD = _FvdDefaults()

CREATE_OPTIONS: dict[str, tuple[CreateOption, ...]] = {
    "raw": (CreateOption("preallocation", "off|falloc|full", "how to allocate the file", "off"),),
    "parallels": (
        CreateOption("cluster_size", "size", "bytes per cluster (track)", _kib(_PARALLELS_CLUSTER)),
    ),
    "qcow2": (
        CreateOption("cluster_size", "size", "cluster size, 512 to 2M, a power of two", "64k"),
        CreateOption("compat", "0.10|1.1", "image version (v2 or v3)", "1.1"),
        CreateOption("extended_l2", "bool", "subclusters (32 per cluster, needs >= 16k)", "off"),
        CreateOption("lazy_refcounts", "bool", "defer refcount updates (v3)", "off"),
        CreateOption("compression_type", "zlib|zstd", "compression of compressed clusters", "zlib"),
        CreateOption("refcount_bits", "num", "bits per refcount, a power of two <= 64", "16"),
        CreateOption("preallocation", "off|metadata", "map every cluster at creation", "off"),
        CreateOption("data_file", "str", "keep guest data in this separate file"),
        CreateOption("data_file_raw", "bool", "the data file is a valid raw image", "off"),
    ),
    "fvd": (
        CreateOption("compact", "bool", "allocate storage by a chunk table (thin image)", "off"),
        CreateOption(
            "block_size", "size", "bytes per bitmap bit (copy unit)", _kib(_FVD.block_size)
        ),
        CreateOption(
            "chunk_size", "size", "bytes per table entry (compact)", _kib(_FVD.chunk_size)
        ),
        CreateOption("journal_size", "size", "metadata journal; 0: none", _kib(_FVD.journal_size)),
        CreateOption(
            "storage_grow_unit",
            "size",
            "data store growth step (compact)",
            _kib(_FVD.storage_grow_unit),
        ),
        CreateOption("data_file", "str", "keep data in this separate raw file"),
        CreateOption(
            "add_storage_cmd",
            "str",
            "command to grow storage; run only if the export allows it",
        ),
        CreateOption(
            "copy_on_read",
            "bool",
            "save base data read by clients into the image",
            "on with a base",
        ),
        CreateOption(
            "detect_zero_blocks", "bool", "mark all-zero base blocks present at creation", "off"
        ),
        CreateOption(
            "max_outstanding_copy_on_read_data",
            "size",
            "unsaved copy-on-read bytes before copy-on-read pauses",
            _kib(_FVD.max_outstanding_copy_on_read_data),
        ),
        CreateOption(
            "prefetch_start_delay",
            "num",
            "seconds after open before prefetch; -1: never",
            str(_FVD.prefetch_start_delay),
        ),
        CreateOption(
            "num_prefetch_slots", "num", "prefetch requests in flight", str(_FVD.num_prefetch_slots)
        ),
        CreateOption(
            "bytes_per_prefetch",
            "size",
            "bytes per prefetch request",
            _kib(_FVD.bytes_per_prefetch),
        ),
        CreateOption(
            "prefetch_min_read_throughput",
            "num",
            "KiB/s; below it prefetch backs off",
            str(_FVD.prefetch_min_read_throughput),
        ),
        CreateOption(
            "prefetch_max_read_throughput",
            "num",
            "KiB/s cap; 0: none",
            str(_FVD.prefetch_max_read_throughput),
        ),
        CreateOption(
            "prefetch_min_write_throughput",
            "num",
            "KiB/s; below it prefetch backs off",
            str(_FVD.prefetch_min_write_throughput),
        ),
        CreateOption(
            "prefetch_max_write_throughput",
            "num",
            "KiB/s cap; 0: none",
            str(_FVD.prefetch_max_write_throughput),
        ),
        CreateOption(
            "prefetch_throttle_time",
            "num",
            "ms; a back-off sleeps up to this",
            str(_FVD.prefetch_throttle_time),
        ),
        CreateOption(
            "prefetch_read_throughput_measure_time",
            "num",
            "ms; read throughput window",
            str(_FVD.prefetch_read_throughput_measure_time),
        ),
        CreateOption(
            "prefetch_write_throughput_measure_time",
            "num",
            "ms; write throughput window",
            str(_FVD.prefetch_write_throughput_measure_time),
        ),
    ),
}


def options_help(fmt: str) -> str:
    """``-o help`` text for ``fmt``, as qemu-img prints it."""
    options = CREATE_OPTIONS.get(fmt)
    if options is None:
        raise ConfigError(f"format {fmt!r} does not support image creation")
    lines = ["Supported options:"]
    for opt in options:
        default = f" (default: {opt.default})" if opt.default is not None else ""
        lines.append(f"  {opt.name}=<{opt.kind}> - {opt.help}{default}")
    return "\n".join(lines)
