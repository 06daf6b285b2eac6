"""Issue 13 items 4 and 6, tenant-bound sessions and retention, on a real Redis and a real gateway:
ids are 128 random bits; a session records its tenant; another tenant resuming it gets NOT_FOUND,
worded as for an unknown id, and the session's keys stay byte for byte as they were (DUMP before and
after); HANG_UP may erase the history at once; --no-store-text keeps no transcript."""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import grpc
import pytest
from test_auth import API_KEYS, start_gateway, write_credentials
from test_gateway_e2e import Phone, config
from test_reliability_e2e import ptt_turn

from vitaserve.api import conversation_pb2 as pb
from vitaserve.common import keys
from vitaserve.common.session_store import (SessionConfig, SessionNotFound, SessionStore, StaleWriteError,
                                            TurnRecord, connect_redis)
from vitaserve.gateway.auth import API_KEYS_FILE_ENV

CFG = SessionConfig(mode="boost", codec="mulaw", sample_rate=8000, system_prompt="You are Luke.")


@contextlib.asynccontextmanager
async def open_store(url: str, **kw):
    r = connect_redis(url)
    try:
        yield SessionStore(r, namespace="t" + secrets.token_hex(6), **kw), r
    finally:
        await r.aclose()


async def dump(r, store: SessionStore, sid: str) -> dict:
    """Every key of the session, serialized by Redis itself (DUMP), and whether each has a TTL."""
    out = {}
    for key in (keys.session_key(store.namespace, sid), keys.history_key(store.namespace, sid)):
        out[key] = (await r.dump(key), await r.pttl(key) > 0)
    return out


def one_turn(store: SessionStore, sid: str, owner: str, text: str = "an answer"):
    async def go():
        t = await store.begin_turn(sid, 0, owner)
        await store.commit_turn(sid, t, TurnRecord(turn=t, user_audio=[1, 2, 3], assistant_ids=[4, 5], text=text),
                                owner)
    return go()


def test_session_ids_are_128_random_bits(redis_url):
    async def main():
        async with open_store(redis_url) as (store, _):
            return [await store.create(CFG, owner="gw") for _ in range(64)]

    ids = asyncio.run(main())
    assert len(set(ids)) == 64 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    # a uuid4 fixes 6 of its bits (version nibble 4, variant 10xx): 122 random bits, not 128
    assert {i[12] for i in ids} != {"4"} and not all(i[16] in "89ab" for i in ids)


def test_another_tenant_cannot_resume_and_leaves_the_session_byte_for_byte(redis_url):
    async def main():
        async with open_store(redis_url) as (store, r):
            sid = await store.create(CFG, owner="gw-a", tenant="acme")
            await one_turn(store, sid, "gw-a")
            before = await dump(r, store, sid)
            ttl_before = await r.pttl(keys.session_key(store.namespace, sid))
            with pytest.raises(SessionNotFound) as theirs:
                await store.claim(sid, "gw-b", tenant="globex")
            ghost = secrets.token_hex(16)
            with pytest.raises(SessionNotFound) as unknown:
                await store.claim(ghost, "gw-b", tenant="globex")
            after = await dump(r, store, sid)
            ttl_after = await r.pttl(keys.session_key(store.namespace, sid))
            mine = await store.claim(sid, "gw-a2", tenant="acme")
            return before, after, ttl_before, ttl_after, str(theirs.value), str(unknown.value), sid, ghost, mine

    before, after, ttl_before, ttl_after, theirs, unknown, sid, ghost, mine = asyncio.run(main())
    assert before == after and all(data for data, _ in before.values())
    assert ttl_after <= ttl_before  # not even the TTL was refreshed
    assert theirs.replace(sid, "ID") == unknown.replace(ghost, "ID")  # nothing tells the two apart
    assert (mine.tenant, mine.owner, mine.fence, len(mine.history)) == ("acme", "gw-a2", 1, 1)


def test_a_session_from_before_tenants_belongs_to_anonymous_callers(redis_url):
    async def main():
        async with open_store(redis_url) as (store, r):
            sid = await store.create(CFG, owner="gw")
            await r.hdel(keys.session_key(store.namespace, sid), "tenant")  # as the previous release wrote it
            with pytest.raises(SessionNotFound):
                await store.claim(sid, "gw-x", tenant="acme")
            return (await store.claim(sid, "gw-y", tenant=keys.ANONYMOUS_TENANT)).tenant

    assert asyncio.run(main()) == keys.ANONYMOUS_TENANT


def test_hang_up_with_erase_deletes_history_and_prompt_now_and_only_by_its_owner(redis_url):
    async def main():
        async with open_store(redis_url) as (store, r):
            sid = await store.create(CFG, owner="gw-a", tenant="acme")
            await one_turn(store, sid, "gw-a")
            with pytest.raises(StaleWriteError):
                await store.end(sid, owner="gw-intruder", erase=True)
            kept = await r.llen(keys.history_key(store.namespace, sid))
            await store.end(sid, owner="gw-a", erase=True)
            rec = await store.get(sid)
            return kept, await r.exists(keys.history_key(store.namespace, sid)), rec

    kept, history_exists, rec = asyncio.run(main())
    assert kept == 1 and history_exists == 0
    assert rec.status == "ended" and rec.history == [] and rec.config.system_prompt == ""


def test_no_store_text_keeps_the_token_ids_but_no_transcript(redis_url):
    async def main():
        async with open_store(redis_url, store_text=False, session_ttl_s=60) as (store, r):
            sid = await store.create(CFG, owner="gw")
            await one_turn(store, sid, "gw", text="my card number is 1234")
            raw = await r.lrange(keys.history_key(store.namespace, sid), 0, -1)
            return await store.history(sid), raw, await r.pttl(keys.session_key(store.namespace, sid))

    history, raw, ttl_ms = asyncio.run(main())
    assert history[0].text == "" and history[0].user_audio == [1, 2, 3] and b"1234" not in b"".join(raw)
    assert 0 < ttl_ms <= 60_000  # --history-ttl-s is the store's session TTL


# ---- through a real gateway ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tenant_gateway(cluster, tmp_path_factory):
    import test_auth

    signers = {"RS256": test_auth.Signer("RS256", "k1")}
    keys_file, _ = write_credentials(tmp_path_factory.mktemp("creds"), signers)
    gateway, target = start_gateway(cluster, "gw-tenancy", {API_KEYS_FILE_ENV: keys_file})
    try:
        yield target
    finally:
        cluster.run(gateway.stop(0))


def key(tenant: str):
    return (("x-api-key", API_KEYS[tenant]),)


def test_tenant_b_resuming_tenant_a_session_gets_not_found_and_a_state_is_unchanged(cluster, tenant_gateway,
                                                                                     utterance):
    async def dump_keys(sid):
        r = connect_redis(cluster.redis_url)
        try:
            return {k: (await r.dump(k), await r.pttl(k) > 0)
                    for k in (keys.session_key(keys.DEFAULT_NAMESPACE, sid),
                              keys.history_key(keys.DEFAULT_NAMESPACE, sid))}
        finally:
            await r.aclose()

    async def resume(tenant: str, sid: str, hang_up: pb.Control | None = None) -> Phone:
        phone = Phone(tenant_gateway, metadata=key(tenant))
        task = asyncio.create_task(phone.run())
        await phone.outbox.put(config(push_to_talk=True, session_id=sid))
        if hang_up is not None:
            await asyncio.wait_for(phone.event("session_started").wait(), 30)
            await phone.outbox.put(pb.ConverseRequest(control=hang_up))
        await phone.outbox.put(None)
        await asyncio.wait_for(task, 60)
        return phone

    async def main():
        phone = Phone(tenant_gateway, metadata=key("acme"))
        task = asyncio.create_task(phone.run())
        await phone.outbox.put(config(push_to_talk=True))
        await ptt_turn(phone, utterance[:8000], 1)
        await phone.outbox.put(None)  # half-close: the session stays resumable
        assert await asyncio.wait_for(task, 60) == grpc.StatusCode.OK
        sid = phone.of("session_started")[0].session_id
        before = await dump_keys(sid)
        intruder = await resume("globex", sid)
        ghost_id = secrets.token_hex(16)
        ghost = await resume("globex", ghost_id)
        after = await dump_keys(sid)
        owner = await resume("acme", sid, pb.Control(action=pb.Control.HANG_UP, erase_history=True))
        return phone, sid, before, after, intruder, ghost, ghost_id, owner, await dump_keys(sid)

    phone, sid, before, after, intruder, ghost, ghost_id, owner, erased = asyncio.run(main())
    assert phone.of("turn_finished") and all(data for data, _ in before.values())
    assert intruder.error.code() == grpc.StatusCode.NOT_FOUND and not intruder.of("session_started")
    assert ghost.error.code() == grpc.StatusCode.NOT_FOUND
    assert intruder.error.details().replace(sid, "ID") == ghost.error.details().replace(ghost_id, "ID")
    assert after == before  # fence, owner, turn, history: byte for byte
    started = owner.of("session_started")[0]
    assert owner.error is None and started.resumed and started.turns_so_far == 1
    history_key = keys.history_key(keys.DEFAULT_NAMESPACE, sid)
    assert erased[history_key][0] is None  # HANG_UP with erase_history: the history is gone now
