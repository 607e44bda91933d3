"""Why a data-plane connection ended: a bad frame, a refused handshake, or the peer leaving.

Kept apart so the frame, record and socket modules can all raise them without importing each other.
"""

from __future__ import annotations


class FrameError(ValueError):
    """A frame that must not be sent or accepted; the message names the field, its value and the bound."""


class PeerClosed(ConnectionError):
    """The peer ended the connection between frames: a clean end, not a protocol violation."""


class HandshakeRefused(ConnectionError):
    """The server turned the client away (wrong or missing token, bad hello); the message says why."""
