"""``nbdserve img create|info|check|map``: make and inspect images of every format.

Generic work (opening chains, mapping, printing) lives here; each format
package contributes ``create_image`` and ``check_image`` when it has them.
Output and exit statuses follow qemu-img so scripts can switch tools.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import replace
from typing import Any

import trio

from nbdserve.block import formats
from nbdserve.block.chain import Chain, ChainOptions, open_chain
from nbdserve.block.check import EXIT_UNSUPPORTED, CheckReport
from nbdserve.block.device import chain_status
from nbdserve.block.extents import merge_chain_extents
from nbdserve.errors import BackingChainError, ConfigError, NbdServeError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpPeE]?)(?:i?[bB])?\s*$")
_SUFFIX = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(text: str) -> int:
    """qemu-img style sizes: 512, 64M, 1.5G, 16T (binary multiples)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"invalid size {text!r}")
    number, suffix = m.groups()
    value = float(number) * (1 << _SUFFIX[suffix.lower()])
    if value != int(value):
        raise ConfigError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def parse_options(text: str | None) -> dict[str, str]:
    """``-o a=1,b=on`` -> {"a": "1", "b": "on"} (qemu's ,, escape not needed here)."""
    out: dict[str, str] = {}
    if not text:
        return out
    for part in text.split(","):
        if not part:
            continue
        key, sep, value = part.partition("=")
        out[key.strip()] = value.strip() if sep else "on"
    return out


def human_size(n: int) -> str:
    for unit, shift in (
        ("EiB", 60),
        ("PiB", 50),
        ("TiB", 40),
        ("GiB", 30),
        ("MiB", 20),
        ("KiB", 10),
    ):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.3g} {unit}"
    return f"{n} B"


def add_img_parser(sub: Any) -> None:
    img = sub.add_parser("img", help="create and inspect images")
    isub = img.add_subparsers(dest="img_command", required=True)

    create = isub.add_parser("create", help="create an image")
    create.add_argument("-f", "--format", default="raw")
    create.add_argument(
        "-o",
        "--options",
        action="append",
        default=[],
        help="format options NAME=VALUE,...; '-o help' lists them for the format",
    )
    create.add_argument("-b", "--backing", help="backing file")
    create.add_argument("-F", "--backing-format", help="backing file format")
    create.add_argument("-q", "--quiet", action="store_true")
    create.add_argument("path", nargs="?")  # optional only for -o help
    create.add_argument("size", nargs="?")
    create.set_defaults(func=cmd_create)

    info = isub.add_parser("info", help="describe an image and its backing chain")
    info.add_argument("-f", "--format")
    info.add_argument("--output", choices=["human", "json"], default="human")
    info.add_argument("--backing-chain", action="store_true")
    info.add_argument("path")
    info.set_defaults(func=cmd_info)

    check = isub.add_parser("check", help="check (and repair) an image")
    check.add_argument("-f", "--format")
    check.add_argument(
        "-p", "--progress", action="store_true", help="show a progress bar (on a terminal)"
    )
    check.add_argument("--output", choices=["human", "json"], default="human")
    check.add_argument("-r", "--repair", choices=["leaks", "all"])
    check.add_argument("path")
    check.set_defaults(func=cmd_check)

    convert = isub.add_parser("convert", help="copy an image (and its chain) into a new one")
    convert.add_argument("-f", "--format", help="source format (default: probe)")
    convert.add_argument("-O", "--output-format", default="raw")
    convert.add_argument("-o", "--options", action="append", default=[])
    convert.add_argument(
        "-p", "--progress", action="store_true", help="show a progress bar (on a terminal)"
    )
    convert.add_argument("source")
    convert.add_argument("target")
    convert.set_defaults(func=cmd_convert)

    mp = isub.add_parser("map", help="show allocation, like qemu-img map")
    mp.add_argument("-f", "--format")
    mp.add_argument("--output", choices=["human", "json"], default="human")
    mp.add_argument("path")
    mp.set_defaults(func=cmd_map)


def _probe_format(path: str, fmt: str | None) -> str:
    if fmt:
        formats.load(fmt)
        return fmt
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such file")
    with open(path, "rb") as f:
        header = f.read(formats.PROBE_SIZE)
    return formats.probe(header, allow_raw=True)


# ---- create -------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    options: dict[str, str] = {}
    for text in args.options:
        options.update(parse_options(text))
    if "help" in options or "?" in options:  # qemu-img's -o help: list, create nothing
        from nbdserve.block.createopts import options_help

        print(options_help(args.format))
        return 0
    if args.path is None:
        raise ConfigError("image path required")
    size = parse_size(args.size) if args.size else None
    if size is None and args.backing is None:
        raise ConfigError("image size required (or a backing file to take it from)")
    if args.backing is not None and size is None:
        size = trio.run(_backing_size, args.path, args.backing, args.backing_format)
    assert size is not None
    module = formats.load(args.format)
    create = getattr(module, "create_image", None)
    if create is None:
        raise ConfigError(f"format {args.format!r} does not support image creation")
    trio.run(create, args.path, size, options, args.backing, args.backing_format)
    if not args.quiet:
        extra = f" backing_file={args.backing}" if args.backing else ""
        print(f"Formatting '{args.path}', fmt={args.format} size={size}{extra}")
    return 0


async def _backing_size(path: str, backing: str, fmt: str | None) -> int:
    from nbdserve.block.nbdclient import is_nbd_uri, open_nbd_uri

    if is_nbd_uri(backing):  # the operator named it on the command line
        driver = await open_nbd_uri(backing)
        try:
            return driver.size
        finally:
            await driver.aclose()
    base = (
        backing
        if os.path.isabs(backing)
        else os.path.join(os.path.dirname(os.path.abspath(path)), backing)
    )
    chain = await open_chain(base, ChainOptions(fmt=fmt, read_only=True, backing_dirs=["/"]))
    try:
        return chain.top.size
    finally:
        await chain.aclose()


# ---- info ---------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    docs = trio.run(image_info, args.path, args.format)
    if args.output == "json":
        doc: Any = docs if args.backing_chain else docs[0]
        print(json.dumps(doc, indent=4))
        return 0
    for i, doc in enumerate(docs if args.backing_chain else docs[:1]):
        if i:
            print()
        print(_info_human(doc))
    return 0


async def image_info(path: str, fmt: str | None = None) -> list[dict[str, Any]]:
    """One dict per layer, top first, in qemu-img info's JSON vocabulary."""
    chain = await _open_for_info(path, fmt)
    try:
        docs = []
        for layer in chain.layers:
            file = layer.file
            assert file is not None
            st = os.stat(file.path)
            doc: dict[str, Any] = {
                "filename": file.path,
                "format": layer.format_name,
                "virtual-size": layer.size,
                "actual-size": st.st_blocks * 512,
                "dirty-flag": False,
            }
            ref = layer.backing_reference
            if ref is not None:
                doc["backing-filename"] = ref[0]
                if ref[1]:
                    doc["backing-filename-format"] = ref[1]
            doc.update(layer.describe())
            docs.append(doc)
        return docs
    finally:
        await chain.aclose()


async def _open_for_info(path: str, fmt: str | None) -> Chain:
    """The chain for ``img info``; an NBD base is not connected to, only named.

    An image's NBD base is opened only where an export allows it
    (``allow_nbd_backing``); info then describes the layers it can open.
    """
    from nbdserve.block.nbdclient import is_nbd_uri

    options = ChainOptions(fmt=fmt, read_only=True, backing_dirs=["/"])
    try:
        return await open_chain(path, options)
    except BackingChainError:
        chain = await open_chain(path, replace(options, follow_backing=False))
        ref = chain.top.backing_reference
        if ref is None or not is_nbd_uri(ref[0]):
            await chain.aclose()
            raise
        return chain


def _info_human(doc: dict[str, Any]) -> str:
    lines = [
        f"image: {doc['filename']}",
        f"file format: {doc['format']}",
        f"virtual size: {human_size(doc['virtual-size'])} ({doc['virtual-size']} bytes)",
        f"disk size: {human_size(doc['actual-size'])}",
    ]
    if "cluster-size" in doc:
        lines.append(f"cluster_size: {doc['cluster-size']}")
    if "backing-filename" in doc:
        lines.append(f"backing file: {doc['backing-filename']}")
        if "backing-filename-format" in doc:
            lines.append(f"backing file format: {doc['backing-filename-format']}")
    specific = doc.get("format-specific")
    if isinstance(specific, dict):
        lines.append("Format specific information:")
        for key, value in specific.get("data", specific).items():
            lines.append(f"    {key}: {_scalar(value)}")
    return "\n".join(lines)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


# ---- check ----------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    fmt = _probe_format(args.path, args.format)
    module = formats.load(fmt)
    check = getattr(module, "check_image", None)
    if check is None:
        print(f"This image format does not support checks ({fmt})", file=sys.stderr)
        return EXIT_UNSUPPORTED
    from nbdserve.progress import Progress, reporting

    bar = Progress(1000, "checking", enabled=None if args.progress else False)
    with reporting(bar):
        report: CheckReport = trio.run(check, args.path, args.repair)
    if args.output == "json":
        print(json.dumps(report.to_json(args.path, fmt), indent=4))
    else:
        print(report.human())
    return report.exit_status()


# ---- convert ----------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    options: dict[str, str] = {}
    for text in args.options:
        options.update(parse_options(text))
    trio.run(
        convert_image,
        args.source,
        args.format,
        args.target,
        args.output_format,
        options,
        args.progress,
    )
    return 0


async def convert_image(
    source: str,
    source_fmt: str | None,
    target: str,
    target_fmt: str,
    options: dict[str, str],
    progress: bool = False,
) -> None:
    """Copy what the source's guest sees into a new image, skipping zeros.

    The target is made by its format's ``create_image`` and written through
    its own driver, so only data ranges cost I/O and the target stays sparse.
    """
    module = formats.load(target_fmt)
    create = getattr(module, "create_image", None)
    if create is None:
        raise ConfigError(f"format {target_fmt!r} does not support image creation")
    src = await open_chain(source, ChainOptions(fmt=source_fmt, read_only=True, backing_dirs=["/"]))
    try:
        size = src.top.size
        await create(target, size, dict(options), None, None)
        dst = await open_chain(target, ChainOptions(fmt=target_fmt))
        try:
            await _copy_data(src, dst, size, progress)
        finally:
            await dst.aclose()
    finally:
        await src.aclose()


async def _copy_data(src: Chain, dst: Chain, size: int, progress: bool) -> None:
    from nbdserve.block.device import BlockDevice
    from nbdserve.progress import Progress

    reader = BlockDevice(src.top, read_only=True)
    writer = BlockDevice(dst.top)
    step = 4 * 1024 * 1024
    buf = bytearray(step)
    zeros = memoryview(bytes(step))
    with Progress(size, "converting", enabled=None if progress else False) as bar:
        pos = 0
        while pos < size:
            extents = await chain_status(src.top, pos, min(size - pos, 1 << 30))
            for e in merge_chain_extents(extents):
                if not e.zero:
                    for off in range(e.offset, e.end, step):
                        n = min(step, e.end - off)
                        view = memoryview(buf)[:n]
                        await reader.readinto(off, view)
                        if view != zeros[:n]:  # data that reads as zeros stays a hole
                            await writer.write(off, view)
                bar.advance(e.length)
                pos = e.end
        await writer.flush()


# ---- map ------------------------------------------------------------------------


def cmd_map(args: argparse.Namespace) -> int:
    entries = trio.run(image_map, args.path, args.format)
    if args.output == "json":
        print(json.dumps(entries, indent=0).replace("\n", " ").replace("[ ", "[").strip())
        return 0
    print(f"{'Offset':<20}{'Length':<20}{'Depth':<8}{'Data':<6}Zero")
    for e in entries:
        print(
            f"{e['start']:<#20x}{e['length']:<#20x}{e['depth']:<8}"
            f"{str(e['data']).lower():<6}{str(e['zero']).lower()}"
        )
    return 0


async def image_map(path: str, fmt: str | None = None) -> list[dict[str, Any]]:
    """Whole-image allocation in qemu-img map's JSON vocabulary (without host offsets).

    ``depth`` is the 0-based layer that decides the content; unallocated
    ranges report the bottom layer's depth with ``present`` false.
    """
    chain = await open_chain(path, ChainOptions(fmt=fmt, read_only=True, backing_dirs=["/"]))
    try:
        top = chain.top
        bottom = len(chain.layers) - 1
        out: list[dict[str, Any]] = []
        pos = 0
        while pos < top.size:
            extents = merge_chain_extents(await chain_status(top, pos, top.size - pos))
            for e in extents:
                present = e.depth > 0
                entry = {
                    "start": e.offset,
                    "length": e.length,
                    "depth": e.depth - 1 if present else bottom,
                    "present": present,
                    "zero": e.zero,
                    "data": e.data,
                }
                prev = out[-1] if out else None
                if prev is not None and all(
                    prev[k] == entry[k] for k in ("depth", "present", "zero", "data")
                ):
                    prev["length"] += e.length
                else:
                    out.append(entry)
            pos = extents[-1].end
        return out
    finally:
        await chain.aclose()


__all__ = ["NbdServeError", "add_img_parser", "image_info", "image_map", "parse_size"]
