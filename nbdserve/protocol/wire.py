"""Wire layouts of the NBD protocol.

The construct declarations are the specification.  The ``struct.Struct``
twins below them exist only for the per-request path, and a property test
(tests/unit/protocol/test_wire.py) proves each twin agrees with its
declaration.
"""

from __future__ import annotations

import struct

from construct import (
    Bytes,
    Const,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    Struct,
)

from nbdserve.protocol.constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
)

# ---- handshake --------------------------------------------------------------

GREETING = Struct(
    "nbdmagic" / Const(NBDMAGIC, Int64ub),
    "ihaveopt" / Const(IHAVEOPT, Int64ub),
    "handshake_flags" / Int16ub,
)

CLIENT_FLAGS = Struct("client_flags" / Int32ub)

OPTION_HEADER = Struct(
    "magic" / Int64ub,  # checked by the reader: a mismatch is a framing error
    "option" / Int32ub,
    "length" / Int32ub,
)

OPTION_REPLY_HEADER = Struct(
    "magic" / Const(OPT_REPLY_MAGIC, Int64ub),
    "option" / Int32ub,
    "reply_type" / Int32ub,
    "length" / Int32ub,
)

EXPORT_NAME_REPLY = Struct(
    "size" / Int64ub,
    "transmission_flags" / Int16ub,
)
EXPORT_NAME_ZEROES = 124

INFO_EXPORT = Struct(
    "info" / Const(0, Int16ub),
    "size" / Int64ub,
    "transmission_flags" / Int16ub,
)

INFO_BLOCK_SIZE = Struct(
    "info" / Const(3, Int16ub),
    "minimum" / Int32ub,
    "preferred" / Int32ub,
    "maximum" / Int32ub,
)

NAME32 = PascalString(Int32ub, "utf8")

META_CONTEXT_REPLY = Struct(
    "context_id" / Int32ub,
    "name" / Bytes(lambda this: this._.length - 4),
)

# ---- transmission ----------------------------------------------------------

REQUEST = Struct(
    "magic" / Const(REQUEST_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "handle" / Int64ub,
    "offset" / Int64ub,
    "length" / Int32ub,
)

EXTENDED_REQUEST = Struct(
    "magic" / Const(EXTENDED_REQUEST_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "handle" / Int64ub,
    "offset" / Int64ub,
    "length" / Int64ub,
)

SIMPLE_REPLY = Struct(
    "magic" / Const(SIMPLE_REPLY_MAGIC, Int32ub),
    "error" / Int32ub,
    "handle" / Int64ub,
)

STRUCTURED_REPLY = Struct(
    "magic" / Const(STRUCTURED_REPLY_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "handle" / Int64ub,
    "length" / Int32ub,
)

EXTENDED_REPLY = Struct(
    "magic" / Const(EXTENDED_REPLY_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "handle" / Int64ub,
    "offset" / Int64ub,
    "length" / Int64ub,
)

OFFSET_HOLE = Struct("offset" / Int64ub, "length" / Int32ub)
BLOCK_DESCRIPTOR = Struct("length" / Int32ub, "status" / Int32ub)
BLOCK_DESCRIPTOR_EXT = Struct("length" / Int64ub, "status" / Int64ub)
ERROR_HEADER = Struct("error" / Int32ub, "message_length" / Int16ub)

# ---- fast-path twins (proved equal to the declarations above) -------------

REQUEST_STRUCT = struct.Struct(">IHHQQI")
EXTENDED_REQUEST_STRUCT = struct.Struct(">IHHQQQ")
SIMPLE_REPLY_STRUCT = struct.Struct(">IIQ")
STRUCTURED_REPLY_STRUCT = struct.Struct(">IHHQI")
EXTENDED_REPLY_STRUCT = struct.Struct(">IHHQQQ")
OPTION_HEADER_STRUCT = struct.Struct(">QII")
OPTION_REPLY_STRUCT = struct.Struct(">QIII")
# structured OFFSET_DATA header + its 8-byte offset, packed at once
READ_CHUNK_STRUCT = struct.Struct(">IHHQIQ")
EXTENDED_READ_CHUNK_STRUCT = struct.Struct(">IHHQQQQ")
BLOCK_STATUS_HEADER_STRUCT = struct.Struct(">I")
BLOCK_STATUS_EXT_HEADER_STRUCT = struct.Struct(">II")

REQUEST_SIZE = REQUEST_STRUCT.size  # 28
EXTENDED_REQUEST_SIZE = EXTENDED_REQUEST_STRUCT.size  # 32
OPTION_HEADER_SIZE = OPTION_HEADER_STRUCT.size  # 16
