"""dfz's message fabric: trio-native ZeroMQ sockets, typed and validated messages, request/reply,
server push, heartbeats and liveness, credit-based flow control and optional CurveZMQ.

See ``protocol.md`` at the top of the repository for the wire contract.
"""

from .client import Client, ClientConfig, Reply
from .curve import CurveClient, CurveServer, KeyPair, load_public_key
from .errors import (
    ConnectionLost,
    ErrorCode,
    FabricError,
    PeerGone,
    ProtocolError,
    RemoteError,
    RequestTimeout,
)
from .messages import (
    PROTOCOL_VERSION,
    U8,
    U16,
    U32,
    U63,
    Bye,
    Catalogue,
    Error,
    Heartbeat,
    Hello,
    Kind,
    Message,
    Name,
    Text,
    Welcome,
)
from .server import PeerEvent, PeerSession, Request, Server, ServerConfig
from .socket import HostUnreachable, Socket, WouldBlock, default_context

__all__ = [
    "PROTOCOL_VERSION",
    "U8",
    "U16",
    "U32",
    "U63",
    "Bye",
    "Catalogue",
    "Client",
    "ClientConfig",
    "ConnectionLost",
    "CurveClient",
    "CurveServer",
    "Error",
    "ErrorCode",
    "FabricError",
    "Heartbeat",
    "Hello",
    "HostUnreachable",
    "KeyPair",
    "Kind",
    "Message",
    "Name",
    "PeerEvent",
    "PeerGone",
    "PeerSession",
    "ProtocolError",
    "RemoteError",
    "Reply",
    "Request",
    "RequestTimeout",
    "Server",
    "ServerConfig",
    "Socket",
    "Text",
    "Welcome",
    "WouldBlock",
    "default_context",
    "load_public_key",
]
