"""The first exchange on a data-plane connection: who the client is, and proof it holds the token.

The client sends HANDSHAKE {role, stage_id, token?}; the server answers ACK, or CLOSE {reason} and
hangs up. Until then the server reads with `HELLO_LIMITS`, so an unauthenticated peer can make it
allocate at most a few kilobytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeshift.runtime.security import token_matches
from pipeshift.runtime.transport.errors import HandshakeRefused
from pipeshift.runtime.transport.frame import Frame, Kind
from pipeshift.runtime.transport.limits import FrameLimits

HELLO_LIMITS = FrameLimits.messages(Kind.HANDSHAKE)
REPLY_LIMITS = FrameLimits.messages(Kind.ACK, Kind.CLOSE)
_MAX_ROLE_LEN = 64
_HELLO_KEYS = {"role", "stage_id", "token"}


@dataclass(frozen=True)
class Peer:
    """An authenticated client as the server's handler sees it."""

    role: str
    stage_id: int
    address: str


def hello(role: str, stage_id: int, token: str | None) -> Frame:
    body: dict[str, object] = {"role": role, "stage_id": stage_id}
    if token is not None:
        body["token"] = token
    return Frame.message(Kind.HANDSHAKE, body)


def accept_hello(frame: Frame, expected_token: str | None, address: str) -> Peer:
    """The peer a valid hello describes; raises HandshakeRefused with a reason safe to send back."""
    body = frame.body()
    unknown = set(body) - _HELLO_KEYS
    if unknown:
        raise HandshakeRefused(f"unknown hello fields {sorted(unknown)}; expected {sorted(_HELLO_KEYS)}")
    role, stage_id, token = body.get("role"), body.get("stage_id"), body.get("token")
    if not isinstance(role, str) or not 0 < len(role) <= _MAX_ROLE_LEN:
        raise HandshakeRefused(f"hello role must be a string of 1..{_MAX_ROLE_LEN} characters")
    if not isinstance(stage_id, int) or isinstance(stage_id, bool) or not 0 <= stage_id < 2**31:
        raise HandshakeRefused("hello stage_id must be an integer in 0..2^31-1")
    if token is not None and not isinstance(token, str):
        raise HandshakeRefused("hello token must be a string")
    if not token_matches(expected_token, token):
        raise HandshakeRefused("wrong control token" if token is not None else "a control token is required")
    return Peer(role, stage_id, address)


def check_reply(frame: Frame) -> None:
    """Raises HandshakeRefused unless the server's answer to our hello is ACK."""
    if frame.kind is Kind.CLOSE:
        reason = frame.body().get("reason", "no reason given")
        raise HandshakeRefused(f"the server refused the handshake: {reason}")
