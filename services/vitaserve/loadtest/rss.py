"""Resident memory of every process of a cluster, sampled from /proc, and its growth over a soak.

Each service leads its own process group (LocalCluster starts each with a new session), so a
group's members are the service and its children: tritonserver and its python backend stubs, a
service's worker processes. A process is named `<service>` when it leads the group and
`<service>/<comm>:<pid>` otherwise, so a restarted child is a new series, never mixed with the old.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitaserve.devcluster.processes import group_pids

# A soak passes when no process grew more than this between the end of the warm-up and the end.
GROWTH_BOUND_PCT = 5.0
# RSS at an instant is the median of the samples in the window before it: a single sample catches
# the allocator mid-cycle (a turn's buffers, torch's caching), the median of ~10 samples does not.
WINDOW_S = 30.0


def vm_rss_kb(pid: int) -> int | None:
    """VmRSS of a live process in kB; None if it is gone (or a zombie, which has no VmRSS line)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def group_rss(service: str, pgid: int) -> dict[str, int]:
    """{process name: RSS kB} of every live process of one service's process group."""
    out = {}
    for pid in group_pids(pgid):
        rss = vm_rss_kb(pid)
        if rss is not None:
            out[service if pid == pgid else f"{service}/{comm(pid)}:{pid}"] = rss
    return out


@dataclass
class RssSeries:
    """Samples of every process: t_s (seconds since the first sample) and {name: kB} per sample."""
    t_s: list[float] = field(default_factory=list)
    rss_kb: list[dict[str, int]] = field(default_factory=list)

    def names(self) -> list[str]:
        return sorted({n for sample in self.rss_kb for n in sample})

    def of(self, name: str) -> tuple[list[float], list[int]]:
        pairs = [(t, s[name]) for t, s in zip(self.t_s, self.rss_kb) if name in s]
        return [t for t, _ in pairs], [v for _, v in pairs]

    def at(self, name: str, t: float, window_s: float = WINDOW_S) -> float | None:
        """Median RSS (kB) of `name` over [t - window_s, t]; None if it has no sample there."""
        values = [v for ts, v in zip(*self.of(name)) if t - window_s <= ts <= t]
        return float(np.median(values)) if values else None


def growth(series: RssSeries, warmup_s: float, window_s: float = WINDOW_S,
           bound_pct: float = GROWTH_BOUND_PCT) -> dict[str, dict]:
    """Per process: RSS at the end of the warm-up and at the end (medians over `window_s`), growth
    in %, and whether it is under the bound. A process without samples at both instants (started
    late, or gone) gets ok None: it cannot be judged, and the report says so. tail_growth_pct is the
    growth over the second half only (midway to the end): a leak keeps growing there, a process
    still warming up when the warm-up ended (caches filling) has levelled off."""
    end = series.t_s[-1] if series.t_s else 0.0
    out = {}
    for name in series.names():
        start_kb, mid_kb = series.at(name, warmup_s, window_s), series.at(name, (warmup_s + end) / 2, window_s)
        end_kb = series.at(name, end, window_s)
        out[name] = {"rss_warmup_kb": start_kb, "rss_end_kb": end_kb, "growth_pct": _pct(start_kb, end_kb),
                     "tail_growth_pct": _pct(mid_kb, end_kb)}
        out[name]["ok"] = None if out[name]["growth_pct"] is None else out[name]["growth_pct"] < bound_pct
    return out


def _pct(before: float | None, after: float | None) -> float | None:
    return None if not before or after is None else round(100.0 * (after - before) / before, 2)


class RssSampler:
    """Samples `groups()` ({service: process group id}, read at each sample so that restarts are
    followed) every `period_s` in a thread of its own: the load's event loop may lag, the samples
    must not."""

    def __init__(self, groups, period_s: float = 3.0):
        self.groups, self.period_s = groups, period_s
        self.series = RssSeries()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = 0.0

    def sample(self) -> None:
        now = time.monotonic()
        if not self.series.t_s:
            self._t0 = now
        rss: dict[str, int] = {}
        for service, pgid in self.groups().items():
            rss.update(group_rss(service, pgid))
        self.series.t_s.append(round(now - self._t0, 2))
        self.series.rss_kb.append(rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample()  # the final instant, after the last call
