"""Channel options shared by every gRPC channel we open (the gateway's backends and Triton, callers)."""

# A backend that comes back (a restart on the same address) is found within the turn's retries, not
# after gRPC's default reconnect backoff of 1 s growing to 120 s (a restarted Triton stayed
# unreachable for minutes with the default).
RECONNECT_BACKOFF = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def keepalive(time_ms: int, timeout_ms: int, without_calls: bool = False) -> list[tuple[str, int]]:
    """HTTP/2 pings every time_ms; the connection fails UNAVAILABLE when one goes timeout_ms
    unanswered (a peer that holds its socket but answers nothing: SIGSTOP, a frozen node).

    grpcio's core takes the unanswered ping's deadline from grpc.http2.ping_timeout_ms (default
    60 s), not from grpc.keepalive_timeout_ms alone: with only the latter set, a client of a
    SIGSTOPped server sent its ping and waited a full minute (grpcio 1.85, measured). Both are set
    here, and pings go on without data frames (max_pings_without_data 0: the default 2 stops
    pinging a stream that only waits for an answer). The server's ping policy must allow time_ms
    (common/grpc_server.py: 10 s without data)."""
    return [("grpc.keepalive_time_ms", time_ms),
            ("grpc.keepalive_timeout_ms", timeout_ms),
            ("grpc.http2.ping_timeout_ms", timeout_ms),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", int(without_calls))]


# What a caller sets to notice a hung gateway (the process holds its socket, the kernel
# acknowledges TCP, nothing answers): an HTTP/2 ping every 15 s, UNAVAILABLE when one goes 5 s
# unanswered. 15 s, not less: the gateway's server refuses pings closer than 10 s apart while it
# sends no data (common/grpc_server.py, min_ping_interval_without_data_ms) and ends the connection
# after a few such strikes; 15 s leaves margin for timer jitter. A caller notices within 20 s.
CALLER_KEEPALIVE_MS = (15_000, 5_000)


def caller_options() -> list[tuple[str, int]]:
    """The channel options of our callers (client/): keepalive as above, reconnect backoff."""
    return [*keepalive(*CALLER_KEEPALIVE_MS), *RECONNECT_BACKOFF]
