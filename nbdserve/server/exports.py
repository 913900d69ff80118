"""ExportRegistry: export name -> open image stack and what NBD advertises for it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from nbdserve.block.base import Support
from nbdserve.block.chain import Chain, ChainOptions, open_chain
from nbdserve.block.device import BlockDevice
from nbdserve.config import ExportConfig
from nbdserve.errors import ConfigError, ImageError, NbdServeError
from nbdserve.logformat import quote
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
    background_scope: trio.CancelScope | None = None
    background_done: trio.Event | None = None
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
    """Owns every open export; closing it flushes and closes every image.

    Exports removed by a reload stop being visible at once but stay open
    ("draining") until their last client leaves; a replacement that needs the
    same image (its lock) is opened when the old one closes.
    """

    def __init__(self, default_export: str | None = None, force_read_only: bool = False) -> None:
        self._exports: dict[str, Export] = {}
        self._draining: list[Export] = []
        self._pending: dict[str, ExportConfig] = {}
        self._nursery: trio.Nursery | None = None
        self.default_export = default_export
        self.force_read_only = force_read_only
        self.shutting_down = False

    @classmethod
    async def open(
        cls,
        configs: tuple[ExportConfig, ...],
        *,
        default_export: str | None = None,
        force_read_only: bool = False,
    ) -> ExportRegistry:
        registry = cls(default_export, force_read_only)
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

    def __iter__(self) -> Iterator[Export]:
        return iter(list(self._exports.values()))

    def __len__(self) -> int:
        return len(self._exports)

    # ---- background work (e.g. FVD prefetch), one cancel scope per export ----

    async def start_background(self, nursery: trio.Nursery) -> None:
        """Run every export's background work in ``nursery`` (owned by serve())."""
        self._nursery = nursery
        for export in list(self._exports.values()):
            await self._start_background(export)

    async def _start_background(self, export: Export) -> None:
        if self._nursery is not None:
            await self._nursery.start(self._run_background, export)

    async def _run_background(
        self, export: Export, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        done = trio.Event()
        export.background_done = done
        try:
            with trio.CancelScope() as scope:
                export.background_scope = scope
                await export.chain.top.run_background(task_status=task_status)
        finally:
            done.set()

    # ---- reload -----------------------------------------------------------------

    async def reload(self, configs: tuple[ExportConfig, ...]) -> None:
        """Make the export list match ``configs`` without dropping clients."""
        wanted = {cfg.name: cfg for cfg in configs}
        for name, export in list(self._exports.items()):
            if wanted.get(name) != export.config:
                del self._exports[name]
                self._draining.append(export)
                LOGGER.info(
                    "event=export-removed export=%s clients=%d", quote(name), export.connections
                )
                await self.release(export)
        for name, cfg in wanted.items():
            if name not in self._exports:
                await self._add(cfg)

    async def _add(self, cfg: ExportConfig) -> None:
        try:
            export = await open_export(cfg, self.force_read_only)
        except ConfigError as exc:
            if any(d.config.path == cfg.path for d in self._draining):
                LOGGER.info("event=export-pending export=%s reason=%r", quote(cfg.name), str(exc))
                self._pending[cfg.name] = cfg  # retried when the old one closes
            else:
                LOGGER.error("event=export-failed export=%s error=%r", quote(cfg.name), str(exc))
            return
        self._pending.pop(cfg.name, None)
        self._exports[cfg.name] = export
        LOGGER.info("event=export-added export=%s", quote(cfg.name))
        await self._start_background(export)

    async def release(self, export: Export) -> None:
        """A client left ``export``: close it if it was removed and is now idle."""
        if export.connections or export not in self._draining:
            return
        self._draining.remove(export)
        with trio.CancelScope(shield=True):
            await _close_export(export)
            for cfg in list(self._pending.values()):
                if cfg.path == export.config.path:
                    await self._add(cfg)

    async def aclose(self) -> None:
        first: BaseException | None = None
        for export in [*self._exports.values(), *self._draining]:
            try:
                await _close_export(export)
            except NbdServeError as exc:
                LOGGER.error(
                    "event=export-close-failed export=%s error=%r", quote(export.name), str(exc)
                )
                first = first or exc
        self._exports.clear()
        self._draining.clear()
        if first is not None:
            raise first


async def _close_export(export: Export) -> None:
    """Stop the export's background work, then flush and close its images."""
    if export.background_scope is not None:
        export.background_scope.cancel()
        assert export.background_done is not None
        await export.background_done.wait()
    await export.chain.aclose()
    LOGGER.info("event=export-closed export=%s", quote(export.name))


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
        direct=cfg.cache == "none",
    )
    try:
        chain = await open_chain(cfg.path, options)
    except ImageError as exc:
        raise ConfigError(f"export {cfg.name!r}: {exc}") from exc
    except NbdServeError as exc:
        raise ConfigError(f"export {cfg.name!r}: {exc}") from exc
    device = BlockDevice(chain.top, read_only=read_only)
    LOGGER.info(
        "event=export-open export=%s path=%s format=%s size=%d read_only=%s",
        quote(cfg.name),
        quote(cfg.path),
        chain.top.format_name,
        device.size,
        device.read_only,
    )
    return Export(cfg, chain, device)
