"""Session tickets: what lets a data-plane connection in, issued by the control plane.

A client calls OpenDataPlane over gRPC (which checks its token, over TLS when the daemon serves
TLS) and presents the ticket in its connection's HELLO. A ticket is the daemon's HMAC over its
expiry and a nonce, under a key made at start and never stored: it proves the holder passed the
token check within `lifetime_s`, and no other daemon (or restart of this one) accepts it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time

from memstore.errors import UnauthenticatedError

_BODY = struct.Struct("<BdQ")  # format, expiry (this process's monotonic clock), nonce
_FORMAT = 1
_MAC_BYTES = 32
TICKET_BYTES = _BODY.size + _MAC_BYTES


class TicketIssuer:
    """Issues and checks one daemon's tickets."""

    def __init__(self, lifetime_s: float) -> None:
        self.lifetime_s = lifetime_s
        self._key = os.urandom(32)

    def issue(self) -> bytes:
        """A ticket good for `lifetime_s` seconds from now."""
        body = _BODY.pack(_FORMAT, time.monotonic() + self.lifetime_s, int.from_bytes(os.urandom(8), "little"))
        return body + self._mac(body)

    def check(self, ticket: bytes) -> float:
        """The ticket's expiry (time.monotonic()), or UnauthenticatedError saying what is wrong with it."""
        if len(ticket) != TICKET_BYTES:
            raise UnauthenticatedError(
                f"a data plane ticket has {TICKET_BYTES} bytes, this one {len(ticket)}: ask OpenDataPlane for one"
            )
        body, mac = ticket[: _BODY.size], ticket[_BODY.size :]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise UnauthenticatedError(
                "the data plane ticket was not issued by this daemon (it restarted, or the ticket was altered): "
                "ask OpenDataPlane for a new one"
            )
        _, expiry, _ = _BODY.unpack(body)
        if expiry <= time.monotonic():
            raise UnauthenticatedError("the data plane ticket expired: ask OpenDataPlane for a new one")
        return expiry

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()
