"""The NBD protocol's numbers and byte layouts (doc/proto.md of NetworkBlockDevice/nbd).

Only constants and `struct.Struct`s live here, no I/O: the server (`capture/nbd.py`) and
the drill's client (`drill/nbd_client.py`) both speak through these, so the two ends of
the fixed newstyle handshake and the simple-reply transmission phase cannot drift apart.
All integers are big-endian.
"""

from __future__ import annotations

import enum
import struct

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and every option header
OLDSTYLE_MAGIC = 0x00420281861253  # an old-style server's greeting, refused by the client
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server) and client flags
FLAG_NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ERROR_BIT = 1 << 31  # set in every error reply type


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    ERR_UNSUP = REP_ERROR_BIT + 1
    ERR_POLICY = REP_ERROR_BIT + 2
    ERR_INVALID = REP_ERROR_BIT + 3
    ERR_PLATFORM = REP_ERROR_BIT + 4
    ERR_TLS_REQD = REP_ERROR_BIT + 5
    ERR_UNKNOWN = REP_ERROR_BIT + 6
    ERR_SHUTDOWN = REP_ERROR_BIT + 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT + 8
    ERR_TOO_BIG = REP_ERROR_BIT + 9


# What an error reply means, for messages (keyed by the reply type without the error bit).
REP_ERROR_MEANINGS = {1: "unsupported option", 2: "refused by policy", 3: "invalid option",
                      4: "platform", 5: "TLS required", 6: "unknown export",
                      7: "shutting down", 8: "block size required", 9: "too big"}


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    CAN_MULTI_CONN = 1 << 8


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    WRITE_ZEROES = 6


CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1

# The spec's block size constraints (minimum, preferred, maximum) when none are announced.
DEFAULT_BLOCK_SIZES = (1, 4096, 32 * 1024 * 1024)

GREETING = struct.Struct(">QQH")       # NBDMAGIC, IHAVEOPT, handshake flags
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")              # also the client flags after the greeting
OPTION = struct.Struct(">QII")         # IHAVEOPT, option, payload length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, payload length
EXPORT_INFO = struct.Struct(">HQH")    # NBD_INFO_EXPORT, size, transmission flags
BLOCK_INFO = struct.Struct(">HIII")    # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zeroes)
REQUEST = struct.Struct(">IHHQQI")     # magic, command flags, type, handle, offset, length
REPLY = struct.Struct(">IIQ")          # magic, error, handle
