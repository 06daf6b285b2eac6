"""What each telephony adapter adds, from the gateway's own timestamps (vita_gateway_adapter_ms).

The caller-side difference against gRPC (loadtest/compare.py) includes everything between the caller
and the call engine: the protocol's framing, base64 and JSON, the WebSocket, the pacing. The adapters
time their own work per message on the server (gateway/adapters/, common/metrics.py): "in" from a
frame read to its call message handed to the engine, "out" from a call message to its frames written
to the socket. This reads that histogram from the gateway's /metrics endpoint; each protocol runs
only on its own side of a comparison, so its totals are that side's.
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

METRIC = "vita_gateway_adapter_ms"


def scrape(metrics_url: str, timeout_s: float = 5.0) -> dict[tuple[str, str], dict]:
    """(protocol, direction) -> {"messages", "mean_ms", "p50_ms", "p95_ms"}; percentiles are the upper
    bound of the bucket they fall in (what a Prometheus histogram can say)."""
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as reply:
        return summarize(reply.read().decode())


def summarize(text: str) -> dict[tuple[str, str], dict]:
    buckets: dict[tuple[str, str], list[tuple[float, float]]] = {}
    sums: dict[tuple[str, str], float] = {}
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != METRIC:
            continue
        for sample in family.samples:
            key = (sample.labels.get("protocol", ""), sample.labels.get("direction", ""))
            if sample.name.endswith("_bucket"):
                buckets.setdefault(key, []).append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_sum"):
                sums[key] = sample.value
            elif sample.name.endswith("_count"):
                counts[key] = sample.value
    out = {}
    for key, count in counts.items():
        if not count:
            continue
        ordered = sorted(buckets.get(key, []))
        out[key] = {"messages": int(count), "mean_ms": round(sums.get(key, 0.0) / count, 3),
                    "p50_ms": _quantile(ordered, count, 0.50), "p95_ms": _quantile(ordered, count, 0.95)}
    return out


def _quantile(cumulative: list[tuple[float, float]], count: float, q: float) -> float | None:
    for upper, seen in cumulative:
        if seen >= q * count:
            return upper
    return None


def table(figures: dict[tuple[str, str], dict]) -> str:
    head = f"{'protocol':<12}{'direction':<10}{'messages':>9}{'mean ms':>9}{'p50 ms <=':>10}{'p95 ms <=':>10}"
    lines = [head, "-" * len(head)]
    for (protocol, direction), f in sorted(figures.items()):
        p50, p95 = f.get("p50_ms"), f.get("p95_ms")
        lines.append(f"{protocol:<12}{direction:<10}{f['messages']:>9}{f['mean_ms']:>9.3f}"
                     f"{'-' if p50 is None else p50:>10}{'-' if p95 is None else p95:>10}")
    return "\n".join(lines)
