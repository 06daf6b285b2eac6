"""structlog set-up shared by the services: JSON lines, with contextvars for trace, session and turn.

Every line of a request carries the fields of its trace (common/tracing.py: trace_id, span_id, turn,
session). A raw session id never reaches a log: `hide_session_ids` replaces a `session_id` field by
its hash (`session`), a decoder `stream_id` (which starts with the session id) by its hash too, and
any 32-hex-digit word inside another field's text (an error's message naming a session) by its
hash: session ids are 128 random bits written as 32 hex digits (SessionStore.create). Trace and
span ids, hex by W3C's definition and meant to be searched for, are left as they are.
"""

from __future__ import annotations

import logging
import re
import sys

import structlog

from vitaserve.common.tracing import session_hash


SESSION_ID_WORD = re.compile(r"(?<![0-9A-Za-z])[0-9a-f]{32}(?![0-9A-Za-z])")
KEPT_AS_THEY_ARE = frozenset({"trace_id", "span_id"})


def hide_session_ids(_, __, event: dict) -> dict:
    """structlog processor: session_id -> session (its hash); stream_id -> its hash; a session id
    inside any other text field -> its hash."""
    session_id = event.pop("session_id", None)
    if session_id:
        event["session"] = session_hash(str(session_id))
    if event.get("stream_id"):
        event["stream_id"] = session_hash(str(event["stream_id"]))
    for key, value in event.items():
        if isinstance(value, str) and key not in KEPT_AS_THEY_ARE:
            event[key] = SESSION_ID_WORD.sub(lambda m: session_hash(m.group()), value)
    return event


def shared_processors() -> list:
    """Every processor but the renderer (tests put their own capture at the end)."""
    return [
        structlog.contextvars.merge_contextvars,
        hide_session_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]


def configure_logging(service: str, level: str = "info", json: bool = True) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper()), format="%(message)s")
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared_processors(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
