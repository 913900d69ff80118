"""ExportRegistry: export name -> open image stack and what NBD advertises for it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from nbdserve.block.base import Support
from nbdserve.block.chain import Chain, ChainOptions, open_chain
from nbdserve.block.device import BlockDevice
from nbdserve.config import ExportConfig
from nbdserve.errors import ConfigError, ImageError, NbdServeError
from nbdserve.protocol.constants import TxFlag
from nbdserve.server.stats import ExportStats

LOGGER = logging.getLogger(__name__)

BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
# Context ids are ours to choose; fixed ids keep logs and tests readable.
META_CONTEXT_IDS: dict[str, int] = {BASE_ALLOCATION: 1, ALLOCATION_DEPTH: 2}


@dataclass(slots=True)
class Export:
    config: ExportConfig
    chain: Chain
    device: BlockDevice
    connections: int = 0
    contexts: tuple[str, ...] = (BASE_ALLOCATION, ALLOCATION_DEPTH)
    stats: ExportStats = field(default_factory=ExportStats)
    _flags: TxFlag = field(default=TxFlag(0))

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def size(self) -> int:
        return self.device.size

    @property
    def read_only(self) -> bool:
        return self.device.read_only

    @property
    def transmission_flags(self) -> TxFlag:
        """Flags advertised truthfully from the driver's capabilities."""
        if self._flags:
            return self._flags
        caps = self.device.caps
        flags = TxFlag.HAS_FLAGS | TxFlag.SEND_CACHE | TxFlag.SEND_DF
        if self.read_only:
            flags |= TxFlag.READ_ONLY
        else:
            flags |= TxFlag.SEND_FLUSH | TxFlag.SEND_WRITE_ZEROES
            if caps.fua is not Support.NONE:
                flags |= TxFlag.SEND_FUA
            if caps.discard:
                flags |= TxFlag.SEND_TRIM
            if caps.zero is Support.NATIVE and caps.fast_zero:
                flags |= TxFlag.SEND_FAST_ZERO
        # every connection shares this one device, so a flush on any of them
        # covers writes completed on all of them: what CAN_MULTI_CONN promises
        if self.config.shared != 1:
            flags |= TxFlag.CAN_MULTI_CONN
        self._flags = flags
        return flags

    def has_room(self) -> bool:
        return self.config.shared == 0 or self.connections < self.config.shared

    def match_contexts(self, query: str, *, listing: bool) -> list[str]:
        """Contexts matching one query (proto.md "Metadata querying")."""
        if query in self.contexts:
            return [query]
        if query.endswith(":") and listing:
            return [c for c in self.contexts if c.startswith(query)]
        return []


class ExportRegistry:
    """Owns every open export; closing it flushes and closes every image."""

    def __init__(self, default_export: str | None = None) -> None:
        self._exports: dict[str, Export] = {}
        self.default_export = default_export
        self.shutting_down = False

    @classmethod
    async def open(
        cls,
        configs: tuple[ExportConfig, ...],
        *,
        default_export: str | None = None,
        force_read_only: bool = False,
    ) -> ExportRegistry:
        registry = cls(default_export)
        try:
            for cfg in configs:
                registry._exports[cfg.name] = await open_export(cfg, force_read_only)
        except BaseException:
            await registry.aclose()
            raise
        return registry

    def lookup(self, name: str) -> Export | None:
        export = self._exports.get(name)
        if export is None and name == "" and self.default_export is not None:
            export = self._exports.get(self.default_export)
        if export is None and name == "" and len(self._exports) == 1:
            export = next(iter(self._exports.values()))
        return export

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._exports.values())

    def __len__(self) -> int:
        return len(self._exports)

    async def aclose(self) -> None:
        first: BaseException | None = None
        for export in list(self._exports.values()):
            try:
                await export.chain.aclose()
                LOGGER.info("export=%s closed", export.name)
            except NbdServeError as exc:
                LOGGER.error("export=%s close failed: %s", export.name, exc)
                first = first or exc
        self._exports.clear()
        if first is not None:
            raise first


async def open_export(cfg: ExportConfig, force_read_only: bool = False) -> Export:
    read_only = cfg.read_only or force_read_only
    options = ChainOptions(
        fmt=cfg.format,
        read_only=read_only,
        max_depth=cfg.max_chain_depth,
        backing_dirs=cfg.backing_dirs,
        probe_raw=cfg.probe_raw,
        settings=dict(cfg.settings),
        locking=cfg.locking,
    )
    try:
        chain = await open_chain(cfg.path, options)
    except ImageError as exc:
        raise ConfigError(f"export {cfg.name!r}: {exc}") from exc
    except NbdServeError as exc:
        raise ConfigError(f"export {cfg.name!r}: {exc}") from exc
    device = BlockDevice(chain.top, read_only=read_only)
    LOGGER.info(
        "export=%s path=%s format=%s size=%d read_only=%s",
        cfg.name,
        cfg.path,
        chain.top.format_name,
        device.size,
        device.read_only,
    )
    return Export(cfg, chain, device)
