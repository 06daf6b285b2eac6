"""How the WebSocket adapters end a call: a close frame's code (RFC 6455 section 7.4.1, 1013 from
the IANA registry) and a reason a person can read, for each way a call can fail."""

from __future__ import annotations

import grpc

NORMAL = 1000
GOING_AWAY = 1001        # the gateway stops
UNSUPPORTED_DATA = 1003  # a binary frame; a media format the adapter does not take
INVALID_PAYLOAD = 1007   # not JSON, not an object, a field of the wrong type, bad base64
POLICY = 1008            # an event out of order or unknown, a refused credential, a bad option, a call limit
TOO_BIG = 1009           # a message over the size limit (the websockets library closes with it itself)
SERVER_ERROR = 1011
TRY_AGAIN_LATER = 1013   # the replica or the tenant's quota is full, the gateway drains, the store is down
MAX_REASON_BYTES = 123   # a close frame carries at most 125 bytes: the 2-byte code and the reason

_BY_STATUS = {
    grpc.StatusCode.OK: NORMAL, grpc.StatusCode.CANCELLED: NORMAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED: TRY_AGAIN_LATER, grpc.StatusCode.UNAVAILABLE: TRY_AGAIN_LATER,
    grpc.StatusCode.INTERNAL: SERVER_ERROR, grpc.StatusCode.UNKNOWN: SERVER_ERROR,
}


class ProtocolViolation(Exception):
    """A message an adapter cannot take: the WebSocket closes with `code` and the message."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def close_code(status: grpc.StatusCode) -> int:
    """The close code of a call that ended with the gRPC `status` Converse would have answered: the
    caller's own doing (a bad option, an unknown session, a credential, a limit) is POLICY."""
    return _BY_STATUS.get(status, POLICY)


def close_reason(message: str) -> str:
    """`message` cut to what a close frame holds (123 bytes of UTF-8), on a character boundary."""
    data = message.encode()
    if len(data) <= MAX_REASON_BYTES:
        return message
    return data[: MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."
