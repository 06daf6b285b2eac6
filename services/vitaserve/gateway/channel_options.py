"""Channel options that every client channel of the gateway shares (encoder, decoder, Triton)."""

# A backend that comes back (a restart on the same address) is found within the turn's retries, not
# after gRPC's default reconnect backoff of 1 s growing to 120 s (a restarted Triton stayed
# unreachable for minutes with the default).
RECONNECT_BACKOFF = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
