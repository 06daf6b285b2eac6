"""Issue 13 item 5, per-tenant quotas shared by gateway replicas through a real Redis: concurrent
calls (leases a live call refreshes and a killed gateway's lapse) and new calls per minute; over a
limit the call gets RESOURCE_EXHAUSTED with google.rpc.RetryInfo while the calls under it go on."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from test_auth import API_KEYS, start_gateway, write_credentials
from test_gateway_e2e import Phone, config
from test_reliability_e2e import ptt_turn

from vitaserve.api import audio_pb2, conversation_pb2 as pb, conversation_pb2_grpc
from vitaserve.common.session_store import connect_redis
from vitaserve.gateway.auth import API_KEYS_FILE_ENV
from vitaserve.gateway.quota import CONCURRENT_RETRY_S, QuotaExceeded, Quotas, TenantLimits, load_tenant_limits_file


def quotas(url: str, namespace: str, limits: TenantLimits, **kw) -> Quotas:
    return Quotas(connect_redis(url), limits, namespace=namespace, **kw)


def test_concurrent_calls_are_shared_by_replicas_and_other_tenants_go_on(redis_url):
    async def main():
        ns = "q" + secrets.token_hex(6)
        a, b = (quotas(redis_url, ns, TenantLimits(max_calls=2)) for _ in range(2))  # two replicas
        try:
            first, second = a.call("acme"), b.call("acme")
            await first.__aenter__()
            await second.__aenter__()
            with pytest.raises(QuotaExceeded) as full:
                async with a.call("acme"):
                    pass
            async with b.call("globex"):  # another tenant has its own slots
                pass
            await first.__aexit__(None, None, None)
            async with b.call("acme"):  # a slot came back when a call ended
                pass
            await second.__aexit__(None, None, None)
            return full.value
        finally:
            await a.redis.aclose()
            await b.redis.aclose()

    full = asyncio.run(main())
    assert full.retry_after_s == CONCURRENT_RETRY_S and "2 calls at once" in str(full)


def test_new_calls_per_minute_say_when_the_oldest_leaves_the_window(redis_url):
    async def main():
        q = quotas(redis_url, "q" + secrets.token_hex(6), TenantLimits(calls_per_minute=3))
        try:
            start = time.monotonic()
            for _ in range(3):
                async with q.call("acme"):
                    pass
            with pytest.raises(QuotaExceeded) as over:
                async with q.call("acme"):
                    pass
            return over.value, time.monotonic() - start
        finally:
            await q.redis.aclose()

    over, elapsed = asyncio.run(main())
    # the first of the 3 started within `elapsed` before the refusal: it leaves the 60 s window
    # between 60 - elapsed and 60 s later (Redis's clock, ms resolution)
    assert 60 - elapsed - 0.01 <= over.retry_after_s <= 60.0, (over.retry_after_s, elapsed)
    assert "3 new calls per minute" in str(over)


def test_a_killed_gateway_frees_its_tenants_slots_within_one_lease(redis_url, tmp_path):
    """A process holding a lease (lease 1 s, refreshed every 1/3 s) keeps it past its first expiry;
    SIGKILLed, it refreshes nothing more and its slot is free within one lease."""
    ns, lease_s = "q" + secrets.token_hex(6), 1.0
    holder = tmp_path / "holder.py"
    holder.write_text(f"""
import asyncio, sys
from vitaserve.common.session_store import connect_redis
from vitaserve.gateway.quota import Quotas, TenantLimits

async def main():
    q = Quotas(connect_redis({redis_url!r}), TenantLimits(max_calls=1), namespace={ns!r}, lease_s={lease_s})
    async with q.call("acme"):
        print("held", flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
""")
    proc = subprocess.Popen([sys.executable, str(holder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == "held"

        async def refused_now() -> bool:
            q = quotas(redis_url, ns, TenantLimits(max_calls=1), lease_s=lease_s)
            try:
                async with q.call("acme"):
                    return False
            except QuotaExceeded:
                return True
            finally:
                await q.redis.aclose()

        time.sleep(2.5 * lease_s)  # past two lease lengths: only its refreshes keep it
        assert asyncio.run(refused_now())
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = time.monotonic()
        while asyncio.run(refused_now()):
            # the lease lapses at most lease_s after its last refresh, i.e. by lease_s after the kill;
            # 2 s more covers this 2-core machine's scheduling and the polls' own round trips
            assert time.monotonic() - killed_at < lease_s + 2.0, "the killed holder's lease did not lapse"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_tenant_limits_file_is_checked():
    assert load_tenant_limits_file(b'{"tenants": {"acme": {"max_calls": 3}}}') == {"acme": TenantLimits(3, 0)}
    for bad, words in ((b'{"tenants": {"acme": {"max_calls": -1}}}', "max_calls"),
                       (b'{"tenants": {"a b": {}}}', "tenant"), (b'{"tenants": {"acme": {"calls": 1}}}', "limits"),
                       (b"[", "JSON")):
        with pytest.raises(ValueError, match=words):
            load_tenant_limits_file(bad)


# ---- through a real gateway ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quota_gateway(cluster, tmp_path_factory):
    import test_auth

    folder = tmp_path_factory.mktemp("creds")
    keys_file, _ = write_credentials(folder, {"RS256": test_auth.Signer("RS256", "k1")},
                                     tenants={"acme": {"max_calls": 1}})
    limits = Path(folder) / "limits.json"
    limits.write_text(json.dumps({"tenants": {"globex": {"calls_per_minute": 1000}}}))
    gateway, target = start_gateway(cluster, "gw-quota", {API_KEYS_FILE_ENV: keys_file},
                                    "--tenant-limits-file", str(limits), "--quota-lease-s", "5")
    try:
        yield target
    finally:
        cluster.run(gateway.stop(0))


def test_the_call_over_a_tenant_quota_gets_retry_info_while_the_calls_under_it_go_on(quota_gateway, utterance):
    synth = pb.SynthesizeRequest(text="Hello there.", max_new_tokens=20, sampling=audio_pb2.SamplingOptions(greedy=True))

    async def synthesize(stub, tenant):
        return [m async for m in stub.Synthesize(synth, metadata=(("x-api-key", API_KEYS[tenant]),), timeout=60)]

    async def main():
        phone = Phone(quota_gateway, metadata=(("x-api-key", API_KEYS["acme"]),))
        call = asyncio.create_task(phone.run())
        await phone.outbox.put(config(push_to_talk=True))
        await asyncio.wait_for(phone.event("session_started").wait(), 30)  # acme's one call is running
        async with grpc.aio.insecure_channel(quota_gateway) as channel:
            stub = conversation_pb2_grpc.ConversationStub(channel)
            start = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as over:
                await synthesize(stub, "acme")
            refused_in = time.perf_counter() - start
            other = await synthesize(stub, "globex")  # another tenant is not held back
            await ptt_turn(phone, utterance[:8000], 1)  # the call under the limit goes on
            await phone.control(pb.Control.HANG_UP)
            await phone.outbox.put(None)
            code = await asyncio.wait_for(call, 60)
            again = await synthesize(stub, "acme")  # its slot came back when the call ended
        return over.value, refused_in, other, phone, code, again

    from prometheus_client import REGISTRY

    def refused() -> float:  # the gateway runs in this process: its metrics are ours to read
        return REGISTRY.get_sample_value("vita_gateway_quota_refused_total", {"rpc": "synthesize"}) or 0.0

    before = refused()
    over, refused_in, other, phone, code, again = asyncio.run(main())
    assert refused() - before == 1  # exported, for the dashboards and alerts
    assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 calls at once" in over.details()
    status = rpc_status.from_call(over)
    (detail,) = status.details
    info = error_details_pb2.RetryInfo()
    assert detail.Unpack(info) and info.retry_delay.ToNanoseconds() == int(CONCURRENT_RETRY_S * 1e9)
    assert refused_in < 2.0  # refused at once, not after waiting for a slot
    assert other[-1].WhichOneof("message") == "finished"
    assert code == grpc.StatusCode.OK and phone.of("turn_finished")
    assert again[-1].WhichOneof("message") == "finished"
