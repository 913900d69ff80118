"""The one exception hierarchy of nbdserve, and the one mapping to NBD errors.

Every class carries ``errno``, the NBD error it implies on the wire (h11's
``error_status_hint``).  ``to_nbd_errno`` is the only place that turns an
exception into a wire error, following nbdkit's ``nbd_errno``: ENOTSUP only
for FAST_ZERO requests, EOVERFLOW only with DF, never ENOMEM.
"""

from __future__ import annotations

import enum
import errno as _errno
from typing import Self


class NbdErrno(enum.IntEnum):
    """Error values of the NBD protocol (proto.md "Error values")."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class NbdServeError(Exception):
    """Root of every exception nbdserve raises on purpose."""

    errno: NbdErrno = NbdErrno.EIO


class ConfigError(NbdServeError):
    """A configuration or command-line problem; reported at startup only."""


class ProtocolError(NbdServeError):
    """A violation of the NBD protocol; abstract (use a subclass)."""

    def __init__(self, msg: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise a subclass")
        super().__init__(msg)


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids: a bug in the caller."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the framing; the only safe answer is to drop it."""


class ImageError(NbdServeError):
    """An image cannot be opened."""


class UnknownFormatError(ImageError):
    """No driver recognises the image."""


class InvalidImageError(ImageError):
    """Bad magic, version, feature bits or limits in an image header."""


class ImageLockedError(ImageError):
    """Another process (QEMU, another nbdserve) holds a conflicting image lock."""


class BackingChainError(ImageError):
    """A backing file is missing, loops, is too deep or is not allowed."""


class BlockError(NbdServeError):
    """Raised by drivers during I/O.

    ``offset`` is the guest offset of the first byte that failed, when the
    layer that raised knows it: a structured READ then answers with
    NBD_REPLY_TYPE_ERROR_OFFSET, telling the client where its data went bad.
    """

    offset: int | None = None

    def at(self, offset: int) -> Self:
        """Record where the error is, unless a lower layer already said more exactly."""
        if self.offset is None:
            self.offset = offset
        return self


class ReadOnlyError(BlockError):
    errno = NbdErrno.EPERM


class ProbedHeaderError(BlockError):
    """A write that would give a probed raw image another format's header (QEMU: EPERM)."""

    errno = NbdErrno.EPERM


class OutOfRangeError(BlockError):
    errno = NbdErrno.EINVAL


class InvalidRequestError(BlockError):
    """A well-framed request the export cannot honour (misaligned, bad flags)."""

    errno = NbdErrno.EINVAL


class NoSpaceError(BlockError):
    errno = NbdErrno.ENOSPC


class NotSupportedError(BlockError):
    """An operation this layer cannot do (or cannot do fast, for FAST_ZERO)."""

    errno = NbdErrno.ENOTSUP


class OverflowError_(BlockError):
    """A structured read that would need fragmenting, under DF."""

    errno = NbdErrno.EOVERFLOW


class ShutdownError(BlockError):
    errno = NbdErrno.ESHUTDOWN


class CorruptImageError(BlockError):
    """Image metadata is inconsistent; the driver is marked failed."""


class HostIOError(BlockError):
    """An OSError from the host, kept as ``__cause__``."""

    def __init__(self, msg: str, host_errno: int = 0) -> None:
        super().__init__(msg)
        self.host_errno = host_errno


_READ_ONLY_ERRNOS = frozenset({_errno.EROFS, _errno.EPERM, _errno.EACCES})
_NO_SPACE_ERRNOS = frozenset({_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG})


def from_os_error(exc: OSError, what: str) -> BlockError:
    """Translate a host OSError once, at the file layer (architecture 2.10)."""
    code = exc.errno or 0
    msg = f"{what}: {exc.strerror or exc}"
    if code in _READ_ONLY_ERRNOS:
        return ReadOnlyError(msg)
    if code in _NO_SPACE_ERRNOS:
        return NoSpaceError(msg)
    if code in (_errno.EOPNOTSUPP, _errno.ENOTSUP):
        return NotSupportedError(msg)
    return HostIOError(msg, code)


def to_nbd_errno(exc: BaseException, *, fast_zero: bool = False, df: bool = False) -> NbdErrno:
    """The only exception -> wire errno mapping (nbdkit ``nbd_errno``)."""
    code = exc.errno if isinstance(exc, NbdServeError) else NbdErrno.EIO
    if code == NbdErrno.ENOTSUP and not fast_zero:
        return NbdErrno.EINVAL
    if code == NbdErrno.EOVERFLOW and not df:
        return NbdErrno.EINVAL
    if code == NbdErrno.ENOMEM:
        return NbdErrno.EIO
    return code
