"""The data plane: stages pass micro-batches (and, during live reconfiguration, KV blocks) as framed
tensors over TCP, validated against what the receiver expects before anything is allocated.

Design notes (why it looks like this):
- Raw framed bytes, never pickle: unpickling from a peer is code execution, and a fixed header lets the
  receiver bound every allocation from the first 60 bytes (see `codec` for the layout).
- One sans-I/O parser drives all readers (asyncio streams, non-blocking and blocking sockets, bytes),
  so the checks cannot drift between them.
- `FrameServer`/`FrameClient` use raw sockets with `recv_into` into the frame's own buffer and send the
  tensor's memory directly, so the payload is copied once by the kernel on each side; asyncio streams
  would add two more copies per frame (`read_frame`/`write_frame` remain for stream-based code).
- Six shape slots rather than four: a KV block frame is `[blocks, 2, block_size, kv_heads, head_dim]`.
- The token travels in the handshake in clear text: it authenticates peers inside a trusted network
  (cluster or loopback); it does not encrypt. Put TLS or a mesh in front when the network is shared.
"""

from pipeshift.runtime.transport.client import BlockingFrameClient, FrameClient
from pipeshift.runtime.transport.codec import decode_frame, encode_frame
from pipeshift.runtime.transport.errors import FrameError, HandshakeRefused, PeerClosed
from pipeshift.runtime.transport.frame import DType, Frame, Kind
from pipeshift.runtime.transport.handshake import Peer
from pipeshift.runtime.transport.kv_meta import KVBlocksMeta
from pipeshift.runtime.transport.limits import Accepts, FrameLimits
from pipeshift.runtime.transport.server import FrameHandler, FrameServer
from pipeshift.runtime.transport.sockets import recv_frame, recv_frame_blocking, send_frame, send_frame_blocking
from pipeshift.runtime.transport.streams import read_frame, write_frame

__all__ = [
    "Accepts",
    "BlockingFrameClient",
    "DType",
    "Frame",
    "FrameClient",
    "FrameError",
    "FrameHandler",
    "FrameLimits",
    "FrameServer",
    "HandshakeRefused",
    "KVBlocksMeta",
    "Kind",
    "Peer",
    "PeerClosed",
    "decode_frame",
    "encode_frame",
    "read_frame",
    "recv_frame",
    "recv_frame_blocking",
    "send_frame",
    "send_frame_blocking",
    "write_frame",
]
