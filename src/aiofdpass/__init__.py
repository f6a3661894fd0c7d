"""Pass file descriptors between processes over UNIX sockets, with asyncio or trio.

Records of bytes plus descriptors (``SCM_RIGHTS``) travel over AF_UNIX
stream sockets; the same code runs on asyncio, uvloop and trio (through
anyio). Start with :func:`channel_pair`, :func:`connect` and :func:`listen`;
:func:`open_child_process` starts a child process joined by a channel.
"""

from __future__ import annotations

from ._channel import FdChannel, channel_pair
from ._credentials import FdPassAttribute, PeerCredentials, same_user
from ._datagram import Datagram, FdDatagramSocket, create_datagram_socket
from ._errors import DescriptorsLostError, FdPassError, LimitError, ProtocolError
from ._fd import Fd
from ._message import Limits, Message
from ._process import CHANNEL_FD_ENV, channel_from_env, open_child_process
from ._statistics import ChannelStatistics, StreamStatistics
from ._stream import FdStream, stream_pair
from ._unix import (
    FdListener,
    FdStreamListener,
    connect,
    connect_stream,
    listen,
    listen_stream,
)
from ._version import __version__

__all__ = [
    "CHANNEL_FD_ENV",
    "ChannelStatistics",
    "Datagram",
    "DescriptorsLostError",
    "Fd",
    "FdChannel",
    "FdDatagramSocket",
    "FdListener",
    "FdPassAttribute",
    "FdPassError",
    "FdStream",
    "FdStreamListener",
    "LimitError",
    "Limits",
    "Message",
    "PeerCredentials",
    "ProtocolError",
    "StreamStatistics",
    "__version__",
    "channel_from_env",
    "channel_pair",
    "connect",
    "connect_stream",
    "create_datagram_socket",
    "listen",
    "listen_stream",
    "open_child_process",
    "same_user",
    "stream_pair",
]

# Show the public names as aiofdpass.X in reprs, tracebacks and docs.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("aiofdpass._"):
        _obj.__module__ = __name__
del _name, _obj
