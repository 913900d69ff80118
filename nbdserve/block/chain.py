"""Open an image and its backing chain (architecture 2.4).

An image file is untrusted input: the backing reference inside it may name
any path.  So backing files must resolve (symlinks included) inside the
directories the export allows, the chain has a depth limit, and cycles are
detected by (st_dev, st_ino).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nbdserve.block import formats
from nbdserve.block.file import (
    PERM_CONSISTENT_READ,
    PERM_RESIZE,
    PERM_WRITE,
    FileBackend,
)
from nbdserve.errors import BackingChainError, ImageError, UnknownFormatError

if TYPE_CHECKING:
    from nbdserve.block.base import FormatDriver

LOGGER = logging.getLogger(__name__)

DEFAULT_MAX_DEPTH = 16


@dataclass(frozen=True, slots=True)
class ChainOptions:
    fmt: str | None = None
    read_only: bool = False
    # images in the chain, the top one included (16: the overlay and 15 backing files)
    max_depth: int = DEFAULT_MAX_DEPTH
    # None: the top image's own directory tree
    backing_dirs: Sequence[str] | None = None
    probe_raw: bool = True
    follow_backing: bool = True
    settings: dict[str, object] = field(default_factory=dict)
    # settings for backing layers (read-only; e.g. a parallels base)
    backing_settings: dict[str, object] = field(default_factory=dict)
    # take QEMU-compatible image locks (the server does; tools unless told not to)
    locking: bool = False
    # cache=none: open every layer's file with O_DIRECT
    direct: bool = False


@dataclass(slots=True)
class Chain:
    """An open chain; ``aclose`` closes the top first, then its backings."""

    top: FormatDriver
    layers: list[FormatDriver]
    stack: contextlib.AsyncExitStack

    async def aclose(self) -> None:
        await self.stack.aclose()


async def open_chain(path: str, options: ChainOptions) -> Chain:
    """Open ``path`` and every backing layer below it, read-only below the top."""
    stack = contextlib.AsyncExitStack()
    layers: list[FormatDriver] = []
    try:
        allowed = _allowed_dirs(path, options.backing_dirs)
        seen: set[tuple[int, int]] = set()
        fmt = options.fmt
        cur_path = path
        read_only = options.read_only
        settings = options.settings
        while True:
            lock = None if not options.locking else "backing" if layers else "top"
            driver = await _open_layer(
                cur_path,
                fmt,
                read_only,
                options.probe_raw,
                settings,
                seen,
                allowed,
                lock,
                direct=options.direct,
            )
            layers.append(driver)
            if layers[:-1]:
                layers[-2].set_backing(driver)
            ref = driver.backing_reference if options.follow_backing else None
            if ref is None:
                break
            ref_path, ref_fmt = ref
            _check_depth(path, len(layers) + 1, options.max_depth)
            if _is_nbd_reference(ref_path):
                nbd_layer = await _open_nbd_backing(cur_path, ref_path, ref_fmt, options)
                layers.append(nbd_layer)
                layers[-2].set_backing(nbd_layer)
                break
            cur_path = resolve_backing_path(cur_path, ref_path, allowed)
            fmt = ref_fmt
            read_only = True
            settings = options.backing_settings
        stack.push_async_callback(_close_layers, list(layers))
        return Chain(layers[0], layers, stack)
    except BaseException:
        await _close_layers(layers)
        raise


def _check_depth(top_path: str, images: int, max_depth: int) -> None:
    """``max_depth`` counts the images of the chain, the top one included (QEMU has no
    such limit; an untrusted image must not make the server open files without end)."""
    if images > max_depth:
        raise BackingChainError(
            f"backing chain of {top_path} is deeper than {max_depth} "
            "(max_chain_depth: images in the chain, this one included)"
        )


async def _close_layers(layers: list[FormatDriver]) -> None:
    """Close top first, then each backing; every layer is closed even if one fails."""
    first: BaseException | None = None
    for layer in layers:
        try:
            await layer.aclose()
        except Exception as exc:  # keep closing the rest, then re-raise
            first = first or exc
    if first is not None:
        raise first


async def _open_layer(
    path: str,
    fmt: str | None,
    read_only: bool,
    probe_raw: bool,
    settings: dict[str, object],
    seen: set[tuple[int, int]],
    allowed: Sequence[str] | None = None,
    lock: str | None = None,
    *,
    direct: bool = False,
) -> FormatDriver:
    file = FileBackend.open(path, read_only=read_only, direct=direct)
    try:
        st = os.fstat(file.fd)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise BackingChainError(f"backing chain loops back to {path}")
        seen.add(key)
        probed = fmt is None
        if fmt is None:
            header = bytes(await file.pread(0, formats.PROBE_SIZE))
            fmt = formats.probe(header, allow_raw=probe_raw)
            if fmt == "raw":
                _warn_probed_raw(path)
        if lock is not None:
            file.lock(*lock_bits(fmt, backing=lock == "backing", read_only=read_only))
        module = formats.load(fmt)
        open_options = formats.OpenOptions(
            read_only,
            settings,
            allowed_dirs=None if allowed is None else tuple(allowed),
            probed=probed,
        )
        driver = await module.open_image(file, open_options)
        LOGGER.debug("event=image-open path=%r format=%s read_only=%s", path, fmt, read_only)
        return driver
    except UnknownFormatError as exc:
        await file.aclose()
        raise UnknownFormatError(f"{path}: {exc}") from None
    except ImageError as exc:
        await file.aclose()
        if str(exc).startswith(path):
            raise
        raise type(exc)(f"{path}: {exc}") from exc
    except BaseException:
        await file.aclose()
        raise


def _warn_probed_raw(path: str) -> None:
    """QEMU warns too: a guest of a probed raw image could write a format's magic to
    its first sector, and the next open would read the image as that format (and
    follow whatever backing file the guest named).  RawDriver refuses such writes
    (EPERM, as QEMU does); the warning still says how to stop guessing."""
    LOGGER.warning(
        "event=format-probed-raw path=%r warning=%r",
        path,
        "image format was not specified and probing guessed raw; give the format "
        '(format = "raw", --format raw), or set probe_raw = false (--no-probe-raw) '
        "to refuse unrecognised images",
    )


def lock_bits(fmt: str, *, backing: bool, read_only: bool) -> tuple[list[int], list[int]]:
    """The (perms, unshared) QEMU takes for such a node (seen in /proc/locks).

    Formats with metadata of their own refuse other writers, raw does not;
    a backing file refuses writers; a writable top layer may resize.
    """
    metadata = fmt != "raw"
    if backing:
        return [PERM_CONSISTENT_READ], [PERM_WRITE, PERM_RESIZE]
    perms = [PERM_CONSISTENT_READ]
    if not read_only:
        perms += [PERM_WRITE, PERM_RESIZE] if metadata else [PERM_WRITE]
    unshared = [PERM_WRITE, PERM_RESIZE] if metadata else [PERM_RESIZE]
    return perms, unshared


def _is_nbd_reference(ref: str) -> bool:
    return ref.split(":", 1)[0].lower() in ("nbd", "nbds", "nbd+unix", "nbds+unix")


async def _open_nbd_backing(
    overlay_path: str, ref: str, fmt: str | None, options: ChainOptions
) -> FormatDriver:
    """An ``nbd://`` / ``nbd+unix://`` base, only where the export's settings allow it.

    An image is untrusted: by default it must not make the server connect
    anywhere, so ``settings["allow_nbd_backing"]`` must be true.
    """
    if not options.settings.get("allow_nbd_backing"):
        raise BackingChainError(
            f"backing file {ref!r} of {overlay_path} is an NBD export; this export's "
            "settings do not allow NBD backing (allow_nbd_backing)"
        )
    if fmt not in (None, "", "raw"):
        raise BackingChainError(
            f"backing file {ref!r} of {overlay_path}: format {fmt!r} over NBD is not supported"
        )
    from nbdserve.block.nbdclient import open_nbd_uri

    driver = await open_nbd_uri(ref)
    LOGGER.debug("event=image-open-nbd-backing uri=%r overlay=%r", ref, overlay_path)
    return driver


def _allowed_dirs(top_path: str, backing_dirs: Sequence[str] | None) -> list[str]:
    if backing_dirs is None:
        return [os.path.dirname(os.path.realpath(top_path))]
    return [os.path.realpath(d) for d in backing_dirs]


def resolve_backing_path(overlay_path: str, ref: str, allowed: Sequence[str]) -> str:
    """Resolve a backing reference as QEMU does, then confine it.

    Relative references are relative to the overlay's directory.  The result,
    with symlinks resolved, must lie inside one of ``allowed``.
    """
    if "://" in ref or ref.startswith(("nbd:", "json:")):
        raise BackingChainError(f"backing file {ref!r} is not a local path")
    if "\0" in ref:  # os.path would raise ValueError: no file has such a name
        raise BackingChainError(f"backing file {ref!r} of {overlay_path} contains a NUL byte")
    base_dir = os.path.dirname(os.path.abspath(overlay_path))
    candidate = ref if os.path.isabs(ref) else os.path.join(base_dir, ref)
    real = os.path.realpath(candidate)
    if not any(real == d or real.startswith(d.rstrip("/") + "/") for d in allowed):
        raise BackingChainError(
            f"backing file {ref!r} of {overlay_path} resolves to {real}, outside the "
            f"allowed directories ({', '.join(allowed)})"
        )
    if not os.path.exists(real):
        raise BackingChainError(f"backing file {ref!r} of {overlay_path} does not exist")
    return real
