"""Sans-IO replication protocol: frames (frames.py) and the connection state machine
(connection.py). asyncio lives in replicator/transport.py."""

from .connection import NEED_DATA, Connection, ConnectionClosed, Role, State
from .frames import (Ack, Error, Feature, FrameType, Hello, LocalProtocolError, ProtocolError,
                     Records, Refusal, Refuse, RemoteProtocolError, Heartbeat, Welcome, negotiate)

__all__ = ["NEED_DATA", "Connection", "ConnectionClosed", "Role", "State", "Ack", "Error",
           "Feature", "FrameType", "Hello", "LocalProtocolError", "ProtocolError", "Records",
           "Refusal", "Refuse", "RemoteProtocolError", "Heartbeat", "Welcome", "negotiate"]
