"""Sans-IO replication protocol: frames and their byte layout (frames.py) and the
connection state machine (connection.py). asyncio lives in replicator/transport.py."""

from .connection import (NEED_DATA, TRANSITIONS, ZSTD_LEVEL, Connection, ConnectionClosed, Role,
                         State)
from .frames import (ANY_SEQ, DEFAULT_MAX_FRAME, HASH_SIZE, HEADER_SIZE, IGNORABLE_FROM,
                     LEGACY_MAGIC, MAGIC, MAX_GENERATIONS, MAX_HASH_REGIONS, MAX_NAME, MAX_REASON,
                     MAX_SEQ, PROTOCOL_MAX, PROTOCOL_MIN, RECORDS_FIXED_SIZE, SUPPORTED_FEATURES,
                     Ack, Diverged, Error, Feature, Fetch, Flush, Frame, FrameType, Handover, HashReply,
                     HashRequest, Heartbeat, Hello, LocalProtocolError, Mismatch, Offload, Processed,
                     ProtocolError, Records, Refusal, Report, Refuse, RemoteProtocolError,
                     ResyncAck, ResyncBegin, ResyncData,
                     ResyncDone, Retain, Successor, Welcome, code_name, decode_header,
                     encode_header, negotiate)

__all__ = [
    # connection.py
    "NEED_DATA", "TRANSITIONS", "ZSTD_LEVEL", "Connection", "ConnectionClosed", "Role", "State",
    # frames.py
    "ANY_SEQ", "DEFAULT_MAX_FRAME", "HASH_SIZE", "HEADER_SIZE", "IGNORABLE_FROM", "LEGACY_MAGIC",
    "MAGIC", "MAX_GENERATIONS", "MAX_HASH_REGIONS", "MAX_NAME", "MAX_REASON", "MAX_SEQ",
    "PROTOCOL_MAX", "PROTOCOL_MIN", "RECORDS_FIXED_SIZE", "SUPPORTED_FEATURES", "Ack",
    "Diverged", "Error", "Feature", "Fetch", "Flush", "Frame", "FrameType", "Handover", "HashReply",
    "HashRequest", "Heartbeat", "Hello", "LocalProtocolError", "Mismatch", "Offload",
    "Processed", "ProtocolError", "Records", "Refusal", "Report", "Refuse",
    "RemoteProtocolError", "ResyncAck", "ResyncBegin", "ResyncData",
    "ResyncDone", "Retain", "Successor", "Welcome", "code_name", "decode_header",
    "encode_header", "negotiate",
]
