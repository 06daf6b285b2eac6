"""Soak and chaos modes of the load test: their pure parts (RSS growth, Redis key kinds, fault
windows), then a short soak and a short chaos run against a LocalCluster of real processes.

The long runs (`vita-audio loadtest --local --soak-minutes 10`, `--chaos --chaos-minutes 10`) print
the figures the issue asks for; these smoke runs check that the reports are complete and add up.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from vitaserve.common import keys
from vitaserve.devcluster.processes import signal_group
from vitaserve.loadtest import redis_keys
from vitaserve.loadtest.chaos import ChaosMonkey, ChaosSettings, Fault, code_name
from vitaserve.loadtest.rss import RssSampler, RssSeries, group_rss, growth, vm_rss_kb
from vitaserve.loadtest.runner import LoadConfig, LoadConfigError
from vitaserve.loadtest.soak import SoakSettings

SERVICES = ("redis", "triton", "encoder", "decoder", "gateway")


# ---- pure parts -----------------------------------------------------------------------------------
def test_growth_is_median_to_median_and_judged_against_the_bound():
    t = [float(s) for s in range(0, 100, 2)]
    flat = [100_000 + (9_000 if i % 7 == 0 else 0) for i in range(len(t))]  # spikes the median ignores
    grows = [100_000 + 300 * i for i in range(len(t))]  # +147 % by the end
    late = [None] * 40 + [50_000] * 10  # started after the warm-up: cannot be judged
    series = RssSeries(t, [{k: v for k, v in (("flat", a), ("grows", b), ("late", c)) if v is not None}
                           for a, b, c in zip(flat, grows, late)])
    g = growth(series, warmup_s=30, window_s=10)
    assert g["flat"]["growth_pct"] == 0.0 and g["flat"]["ok"] is True
    assert g["grows"]["ok"] is False and g["grows"]["growth_pct"] > 5
    # medians of the 6 samples in [20, 30] and in [88, 98]
    assert g["grows"]["rss_warmup_kb"] == 100_000 + 300 * 12.5 and g["grows"]["rss_end_kb"] == 100_000 + 300 * 46.5
    assert g["late"]["ok"] is None and g["late"]["growth_pct"] is None
    assert g["flat"]["tail_growth_pct"] == 0.0 and g["grows"]["tail_growth_pct"] > 4  # +4.7 %: still growing late on


def test_group_rss_names_the_leader_and_each_child():
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while len(rss := group_rss("svc", proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rss["svc"] > 0
        children = [name for name in rss if name.startswith("svc/sleep:")]
        assert len(children) == 2 and all(rss[c] > 0 for c in children)
        sampler = RssSampler(lambda: {"svc": proc.pid}, period_s=0.05)
        with sampler:
            time.sleep(0.3)
        assert len(sampler.series.t_s) >= 3 and sampler.series.t_s == sorted(sampler.series.t_s)
        assert "svc" in sampler.series.rss_kb[-1]
    finally:
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait(5)
    assert vm_rss_kb(proc.pid) is None  # gone


def test_redis_key_kinds_follow_the_key_layout():
    sid = "0" * 32
    ns = keys.DEFAULT_NAMESPACE
    names = [keys.session_key(ns, sid), keys.history_key(ns, sid), keys.decoder_state_key(ns, "s:1"), f"{ns}:x"]
    assert [redis_keys.kind_of(k) for k in names] == ["session", "history", "decoder", "other"]
    assert redis_keys.count_by_kind(names) == {"session": 1, "history": 1, "decoder": 1, "other": 1, "total": 4}


def test_fault_windows_and_codes():
    monkey = ChaosMonkey(None, ChaosSettings(minutes=1, grace_s=2.0))
    monkey.faults = [Fault("encoder", "kill", at=100.0, recovered_at=105.0), Fault("redis", "stop", at=200.0)]
    assert monkey.overlaps(90, 100.5) and monkey.overlaps(106.9, 110)  # meets the window, grace included
    assert not monkey.overlaps(107.5, 190) and not monkey.overlaps(10, 99)
    assert monkey.overlaps(1000, 1001)  # a fault never recovered covers everything after it
    assert monkey.active() and monkey.last_recovered() == 105.0
    assert code_name("14: backend unavailable") == "UNAVAILABLE" and code_name("4: x") == "DEADLINE_EXCEEDED"


@pytest.mark.parametrize("make, words", [
    (lambda: ChaosSettings(minutes=1, components=("gpu",)), "components must be some of"),
    (lambda: ChaosSettings(minutes=1, faults=("explode",)), "faults must be some of"),
    (lambda: ChaosSettings(minutes=0), "positive"),
    (lambda: SoakSettings(minutes=1, warmup_s=120), "must end before the soak"),
    (lambda: SoakSettings(minutes=1, warmup_s=10, sample_s=0), "sampling period")])
def test_bad_soak_and_chaos_settings_say_what_is_wrong(make, words):
    with pytest.raises(LoadConfigError, match=words):
        make()


# ---- against a LocalCluster of real processes ----------------------------------------------------
@pytest.fixture(scope="module")
def local_cluster(ckpt, tmp_path_factory):
    """One cluster for the soak, then the chaos run (which restarts some of its services)."""
    from vitaserve.devcluster.cluster import LocalCluster
    from vitaserve.devcluster.processes import free_port

    cluster = LocalCluster(ckpt / "lm", ckpt / "tokenizer", ckpt / "decoder", port=free_port(),
                           workdir=tmp_path_factory.mktemp("cluster"), max_len=1024, grace_s=3)
    cluster.start(300)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    from vitaserve.loadtest.speech import utterances

    return utterances(8000, tmp_path_factory.mktemp("speech"))


def config(cluster, **kw) -> LoadConfig:
    return LoadConfig(target=f"127.0.0.1:{cluster.port}", concurrency=(2,), turns=2, push_to_talk=True,
                      max_new_tokens=30, turn_timeout_s=60, **kw)


def test_soak_smoke_reports_memory_of_every_process_and_redis_keys(local_cluster, speech):
    """~40 s of 2 callers with barge-ins: every process sampled and judged, every call's keys accounted for."""
    from vitaserve.loadtest.soak import run_soak, soak_html, soak_text

    soak = SoakSettings(minutes=0.66, warmup_s=10, sample_s=1.0, settle_s=keys.ENDED_SESSION_TTL_S + 5)
    report = run_soak(local_cluster, config(local_cluster, barge_in_prob=0.5, seed=3), speech, soak, calls=2)
    assert report["calls"]["ok"] >= 2 and not report["calls"]["failed"], report["calls"]
    assert report["turns"]["total"] >= 4 and not report["turns"]["failed_by_code"]
    rss = report["rss"]
    assert set(SERVICES) <= set(rss)  # every service's leader
    assert any(name.startswith("triton/") for name in rss)  # and Triton's python backend stub
    for name, r in rss.items():
        assert r["rss_warmup_kb"] > 0 and r["rss_end_kb"] > 0 and r["ok"] is not None, name
    assert report["rss_ok"] == all(r["growth_pct"] < 5 for r in rss.values())
    assert len(report["rss_series"]["t_s"]) >= 25  # 40 s at 1 s
    # Redis: the namespace was empty before. HANG_UP shortens a call's keys to keys.ENDED_SESSION_TTL_S
    # and the gateway ends every decoder stream it used: so within the settle time (that TTL and a
    # margin) every key of the calls is gone
    k = report["redis_keys"]
    assert k["before"]["total"] == 0
    assert k["back_to_baseline"] is True, k
    assert "Redis keys" in soak_text(report) and soak_html(report).count("data:image/png;base64,") == 1


def test_chaos_smoke_counts_add_up_and_every_fault_is_recorded(local_cluster, speech):
    """~1 min of 2 callers while the encoder, decoder or gateway is killed or stopped, 6 s of quiet
    between faults; seed 6 kills the gateway first, so calls lose their streams and resume them."""
    from vitaserve.loadtest.chaos import chaos_html, chaos_text, run_chaos

    chaos = ChaosSettings(minutes=1.0, every_s=6, seed=6, components=("encoder", "decoder", "gateway"),
                          faults=("kill", "stop"), stop_s=2)
    report = run_chaos(local_cluster, config(local_cluster, seed=1), speech, chaos, calls=2)
    t, c, faults = report["turns"], report["calls"], report["faults"]
    assert len(faults) >= 2 and (faults[0]["component"], faults[0]["fault"]) == ("gateway", "kill"), faults
    assert all(f["recovered_at_s"] is not None and f["recovery_s"] >= 0 and not f["error"] for f in faults)
    assert [f["at_s"] for f in faults] == sorted(f["at_s"] for f in faults)
    assert t["attempted"] == t["completed"] + t["failed"] == len(report["turn_log"]) > 0
    assert sum(t["failed_by_code"].values()) == t["failed"] == t["failed_at_a_fault"] + t["failed_outside_faults"]
    assert all(code.isupper() for code in t["failed_by_code"])  # status names, not numbers
    assert c["started"] >= c["completed"] + c["lost"] - c["cut"] and c["completed"] > 0
    assert len(report["lost"]) + c["cut"] == c["lost"]
    assert c["reconnects"] >= 1  # a call whose stream the gateway kill broke resumed its session
    assert "turns attempted" in chaos_text(report) and chaos_html(report).count("data:image/png;base64,") == 1
    assert local_cluster.dead() == []  # every component is back


@pytest.mark.parametrize("args, words", [
    (["--target", "127.0.0.1:1", "--chaos"], "--chaos needs --local"),
    (["--local", "--chaos", "--soak-minutes", "1"], "separate runs"),
    (["--local", "--chaos", "--chaos-components", "gpu"], "components must be some of"),
    (["--local", "--soak-minutes", "1", "--soak-warmup-s", "90"], "must end before the soak")])
def test_cli_refuses_what_cannot_run_before_starting_anything(args, words):
    import sys

    done = subprocess.run([sys.executable, "-m", "vitaserve.cli", "loadtest", *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and words in done.stderr, done.stderr
