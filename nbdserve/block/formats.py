"""The format registry: how to recognise and open each image format.

Each format package exposes ``probe(header: bytes) -> bool`` and
``async open_image(file, options) -> FormatDriver``.  Entries are imported
lazily so that a tool run or a raw export does not pay for every format.
Order matters: probing tries formats in this order, raw last.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

from nbdserve.errors import UnknownFormatError

if TYPE_CHECKING:
    from nbdserve.block.base import FormatDriver
    from nbdserve.block.file import FileBackend

PROBE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class OpenOptions:
    """What the export configuration tells a format driver at open."""

    read_only: bool = False
    # format-specific settings, e.g. parallels prealloc_mode, fvd prefetch knobs
    settings: Mapping[str, object] = field(default_factory=dict)
    # directories the image's own file references (e.g. an FVD data_file) may
    # resolve into; None: the image's own directory (as chain.py does)
    allowed_dirs: tuple[str, ...] | None = None
    # the format was guessed from the image's first bytes, not given
    probed: bool = False


class FormatModule(Protocol):
    def probe(self, header: bytes) -> bool: ...

    def open_image(self, file: FileBackend, options: OpenOptions) -> Awaitable[FormatDriver]: ...


# name -> module path, in probe order (raw is never probed by magic)
_MODULES: dict[str, str] = {
    "qcow2": "nbdserve.block.qcow2",
    "parallels": "nbdserve.block.parallels",
    "fvd": "nbdserve.block.fvd",
    "raw": "nbdserve.block.rawfmt",
}


def format_names() -> list[str]:
    """Formats whose modules are present in this installation."""
    names = []
    for name in _MODULES:
        try:
            load(name)
        except UnknownFormatError:
            continue
        names.append(name)
    return names


def load(name: str) -> FormatModule:
    path = _MODULES.get(name)
    if path is None:
        raise UnknownFormatError(f"unknown image format {name!r}")
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name == path:
            raise UnknownFormatError(f"format {name!r} is not available") from exc
        raise
    return cast(FormatModule, module)


def probe(header: bytes, *, allow_raw: bool) -> str:
    """Name the format of an image from its first bytes."""
    for name in _MODULES:
        if name == "raw":
            continue
        try:
            module = load(name)
        except UnknownFormatError:
            continue
        if module.probe(header):
            return name
    if allow_raw:
        return "raw"
    raise UnknownFormatError("image format not recognised (and probing raw is not allowed)")


OpenFn = Callable[["FileBackend", OpenOptions], Awaitable["FormatDriver"]]
