"""Every Prometheus metric of every service, in one module; latency buckets in milliseconds.

These names are the autoscaling signals the Helm chart reads (active streams per gateway pod,
decode streams per decoder pod); the chart's tests read them from here.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_MS = (5, 10, 25, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000, 30000)

# -- gateway ------------------------------------------------------------------------------------
GATEWAY_ACTIVE_STREAMS = Gauge("vita_gateway_active_streams", "Converse streams open on this replica")
GATEWAY_TURNS = Counter("vita_gateway_turns_total", "turns answered", ["outcome"])  # completed|interrupted|failed
GATEWAY_FIRST_AUDIO_MS = Histogram("vita_gateway_first_audio_ms",
                                   "end of the caller's utterance -> first audio chunk sent", ["mode"],
                                   buckets=LATENCY_MS)
GATEWAY_STAGE_MS = Histogram("vita_gateway_stage_ms", "per-turn time of each stage before the first audio",
                             ["stage"], buckets=LATENCY_MS)  # encode|first_token|first_block|first_decode
GATEWAY_ERRORS = Counter("vita_gateway_errors_total", "calls and turns that failed, by gRPC status", ["code"])
GATEWAY_DRAINING = Gauge("vita_gateway_draining", "1 while this replica refuses new calls (shutdown)")
GATEWAY_BACKEND_RETRIES = Counter("vita_gateway_backend_retries_total",
                                  "encoder/decoder calls retried, or failed at once because the backend's retry "
                                  "budget was spent", ["backend", "outcome"])  # retried|denied
# admission: the HPA may scale on (Converse + Synthesize + Transcribe in progress) / limit; a load
# balancer sees a full replica as calls == max_calls, and refusals count up
GATEWAY_CALLS = Gauge("vita_gateway_calls", "calls in progress on this replica (Converse, Synthesize, Transcribe)")
GATEWAY_MAX_CALLS = Gauge("vita_gateway_max_calls", "calls this replica serves at once (--max-calls)")
GATEWAY_REFUSED = Counter("vita_gateway_refused_total", "calls refused because the replica was full", ["rpc"])
# by RPC, not by tenant: JWT tenants are any claim value, a label per tenant would be unbounded
GATEWAY_QUOTA_REFUSED = Counter("vita_gateway_quota_refused_total",
                                "calls refused because their tenant was at a quota (shared by all replicas)", ["rpc"])
GATEWAY_OUTBOX_MESSAGES = Gauge("vita_gateway_outbox_messages",
                                "answer messages waiting for their callers to read them (at most 64 per call)")
GATEWAY_CALL_LIMITS = Counter("vita_gateway_call_limits_total", "Converse calls ended by a limit",
                              ["limit"])  # first_message|idle|max_call|reader_stall
# telephony adapters (gateway/adapters/): what each protocol edge adds on top of the call engine,
# from server-side timestamps: "out" = a call message -> its protocol frames written to the socket,
# "in" = a frame read -> its call message handed to the engine
GATEWAY_ADAPTER_MS = Histogram("vita_gateway_adapter_ms", "time a telephony adapter adds per message",
                               ["protocol", "direction"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100))
GATEWAY_ADAPTER_CALLS = Gauge("vita_gateway_adapter_calls", "calls open on a telephony adapter", ["protocol"])

# -- encoder ------------------------------------------------------------------------------------
ENCODER_REQUESTS = Counter("vita_encoder_requests_total", "Encode calls, by gRPC status", ["code"])
ENCODER_QUEUE_MS = Histogram("vita_encoder_queue_ms", "wait before a batch picked the request up",
                             buckets=LATENCY_MS)
ENCODER_COMPUTE_MS = Histogram("vita_encoder_compute_ms", "tokenizer forward per batch", buckets=LATENCY_MS)
ENCODER_BATCH_SIZE = Histogram("vita_encoder_batch_size", "requests per forward", buckets=(1, 2, 4, 8, 16, 32, 64))
ENCODER_IN_FLIGHT = Gauge("vita_encoder_in_flight", "Encode calls being served")

# -- decoder ------------------------------------------------------------------------------------
DECODER_REQUESTS = Counter("vita_decoder_requests_total", "DecodeBlock calls, by gRPC status", ["code"])
DECODER_ACTIVE_STREAMS = Gauge("vita_decoder_active_streams",
                               "DecodeBlock calls in progress on this replica (queued or computing)")
DECODER_QUEUE_MS = Histogram("vita_decoder_queue_ms", "wait before a batch picked the block up", buckets=LATENCY_MS)
DECODER_BATCH_SIZE = Histogram("vita_decoder_batch_size", "blocks of concurrent streams per forward",
                               buckets=(1, 2, 4, 8, 16, 32))
DECODER_BLOCK_MS = Histogram("vita_decoder_block_ms", "compute time of the forward that decoded a block (its batch's)",
                             ["first"], buckets=LATENCY_MS)
DECODER_PLAYBACK_SLACK_S = Histogram(
    "vita_decoder_playback_slack_s",
    "audio the caller still had to play when a later block (seq > 0) was requested; near 0: about to stall",
    buckets=(0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0))
DECODER_STATE_BYTES = Histogram("vita_decoder_state_bytes", "serialised stream state size",
                                buckets=(1e3, 1e4, 5e4, 1e5, 2e5, 5e5, 1e6, 2e6, 5e6))

# -- redis (any service) ------------------------------------------------------------------------
STORE_RETRIES = Counter("vita_store_retries_total", "transient Redis failures retried", ["what"])
