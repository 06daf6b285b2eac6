"""structlog set-up shared by the services: JSON lines, with contextvars for trace, session and turn.

Every line of a request carries the fields of its trace (common/tracing.py: trace_id, span_id, turn,
session). A raw session id never reaches a log: `hide_session_ids` replaces a `session_id` field by
its hash (`session`) and a decoder `stream_id` (which starts with the session id) by its hash too.
"""

from __future__ import annotations

import logging
import sys

import structlog

from vitaserve.common.tracing import session_hash


def hide_session_ids(_, __, event: dict) -> dict:
    """structlog processor: session_id -> session (its hash); stream_id -> its hash."""
    session_id = event.pop("session_id", None)
    if session_id:
        event["session"] = session_hash(str(session_id))
    if event.get("stream_id"):
        event["stream_id"] = session_hash(str(event["stream_id"]))
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
