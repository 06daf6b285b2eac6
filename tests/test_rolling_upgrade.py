"""A rolling upgrade runs two releases against one Redis: records written by the previous release
(version 1, written here with raw Redis commands exactly as its scripts wrote them) are read and
continued by this one, its records stay readable by the previous one, and a record of a newer
version fails with a clear error instead of being misread or overwritten."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid

import pytest
import torch

from vitaserve.common import keys
from vitaserve.common.session_store import (
    SessionConfig,
    SessionStore,
    StaleWriteError,
    TurnRecord,
    UnknownSchema,
    connect_redis,
)
from vitaserve.decoder.state_store import DecoderStateStore
from vitaserve.decoder.stream_state import DecoderStreamState

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")

# The fields release 1 wrote: CREATE's HSET, then what BEGIN/COMMIT_TURN and CLAIM set.
V1_SESSION_FIELDS = ("created_at", "updated_at", "turn", "status", "owner", "fence", "op",
                     "mode", "codec", "sample_rate", "system_prompt")
V1_TURN_KEYS = ("turn", "user_audio", "assistant_ids", "text", "interrupted")


def v1_turn(n: int) -> bytes:
    """A history entry as release 1 wrote it: compact JSON, no "v"."""
    return json.dumps({"turn": n, "user_audio": [n, 16383, 0], "assistant_ids": [151665, n],
                       "text": f"answer {n}", "interrupted": False}, separators=(",", ":")).encode()


async def write_v1_session(r, ns: str, sid: str, turns: int) -> None:
    """A session of release 1 after `turns` committed turns, owned by a replica that has gone."""
    hkey, lkey = keys.session_key(ns, sid), keys.history_key(ns, sid)
    await r.hset(hkey, mapping={
        "created_at": "1700000000.000001", "updated_at": "1700000100.000002", "turn": turns,
        "status": "active", "owner": "gw-old/3", "fence": 0, "op": uuid.uuid4().hex,
        "mode": "boost", "codec": "mulaw", "sample_rate": 8000, "system_prompt": "Be brief.",
    })
    await r.rpush(lkey, *[v1_turn(n) for n in range(1, turns + 1)])
    for k in (hkey, lkey):
        await r.pexpire(k, keys.SESSION_TTL_S * 1000)


def test_session_of_the_previous_release_is_resumed_and_continued(redis_url):
    async def body():
        r = connect_redis(redis_url)
        ns, sid = "up" + uuid.uuid4().hex[:8], uuid.uuid4().hex
        store = SessionStore(r, namespace=ns)
        hkey, lkey = keys.session_key(ns, sid), keys.history_key(ns, sid)
        try:
            await write_v1_session(r, ns, sid, turns=2)
            old_turns = [TurnRecord.from_json(v1_turn(n)) for n in (1, 2)]

            rec = await store.claim(sid, "gw-new/1")
            assert (rec.owner, rec.fence, rec.turn, rec.status) == ("gw-new/1", 1, 2, "active")
            assert rec.config == SessionConfig("boost", "mulaw", 8000, "Be brief.")
            assert rec.history == old_turns and await store.history(sid) == old_turns

            t = await store.begin_turn(sid, rec.turn, "gw-new/1", fence=rec.fence)
            assert t == 3
            new = TurnRecord(turn=3, user_audio=[7, 8], assistant_ids=[151665, 9], text="new")
            await store.commit_turn(sid, 3, new, "gw-new/1", fence=rec.fence)
            assert await store.history(sid) == [*old_turns, new]

            raw = [json.loads(x) for x in await r.lrange(lkey, 0, -1)]
            assert ["v" in x for x in raw] == [False, False, True] and raw[2]["v"] == 2
            # The hash is written in place: its fields are those of version 1 (no schema field).
            assert await r.hget(hkey, "schema") is None
            assert (await store.get(sid)).turn == 3

            # What this release creates, release 1 can read: all its fields and keys are there.
            sid2 = await store.create(SessionConfig("boost", "pcm16", 16000), owner="gw-new/1")
            await store.begin_turn(sid2, 0, "gw-new/1")
            await store.commit_turn(sid2, 1, TurnRecord(turn=1, user_audio=[1]), "gw-new/1")
            fields = {k.decode(): v for k, v in (await r.hgetall(keys.session_key(ns, sid2))).items()}
            assert fields["schema"] == b"2" and set(V1_SESSION_FIELDS) <= set(fields)
            turn = json.loads((await r.lrange(keys.history_key(ns, sid2), 0, -1))[0])
            assert set(V1_TURN_KEYS) <= set(turn) and turn["v"] == 2
        finally:
            await r.aclose()

    asyncio.run(body())


def test_session_of_a_newer_release_fails_clearly_and_is_not_taken_over(redis_url):
    async def body():
        r = connect_redis(redis_url)
        ns, sid = "up" + uuid.uuid4().hex[:8], uuid.uuid4().hex
        store = SessionStore(r, namespace=ns)
        hkey, lkey = keys.session_key(ns, sid), keys.history_key(ns, sid)
        try:
            await write_v1_session(r, ns, sid, turns=1)
            await r.hset(hkey, "schema", 3)
            for call in (store.get(sid), store.claim(sid, "gw-new/1"), store.begin_turn(sid, 1, "gw-old/3")):
                with pytest.raises(UnknownSchema, match="schema version 3"):
                    await call
            assert await r.hmget(hkey, ["owner", "fence", "turn"]) == [b"gw-old/3", b"0", b"1"]

            await r.hdel(hkey, "schema")
            await r.rpush(lkey, json.dumps({"v": 3, "turn": 2, "parts": []}))
            with pytest.raises(UnknownSchema, match="turn record is stored in schema version 3"):
                await store.history(sid)
        finally:
            await r.aclose()

    asyncio.run(body())


def _state(blocks: int, finalized: bool = False) -> bytes:
    return DecoderStreamState(blocks_done=blocks, finalized=finalized,
                              prompt_tokens=torch.arange(10 * blocks, dtype=torch.int32)).to_bytes()


def test_decoder_state_of_the_previous_release_is_continued(redis_url):
    """Release 1 kept the state after block 1 under the stream's key and the one before it under
    "<stream>:prev". This release reads the first as a version 1 record without a previous state:
    the stream continues, a retry of block 1 fails clearly, and the next write makes it version 2."""

    async def body():
        r = connect_redis(redis_url)
        ns, stream = "up" + uuid.uuid4().hex[:8], "call:t1"
        states = DecoderStateStore(r, namespace=ns)
        key = keys.decoder_state_key(ns, stream)
        try:
            await r.hset(key, mapping={"seq": 1, "data": _state(1)})
            await r.hset(keys.decoder_state_key(ns, stream + ":prev"), mapping={"seq": 0, "data": _state(0)})

            stored = await states.get(stream)
            assert (stored.seq, stored.prev_seq, stored.schema) == (1, None, 1)
            start = await states.start_of(stream, 2)
            assert not start.retry and start.state.blocks_done == 1
            with pytest.raises(StaleWriteError, match="previous state is gone"):
                await states.start_of(stream, 1)

            assert (await states.save(stream, 2, DecoderStreamState(blocks_done=2))).written
            stored = await states.get(stream)
            assert (stored.seq, stored.prev_seq, stored.schema) == (2, 1, 2)
            retry = await states.start_of(stream, 2)
            assert retry.retry and retry.state.blocks_done == 1

            # A release 1 replica serves block 3: it rewrites seq/data only. The stale previous
            # state is never used for a retry; the stream goes on.
            await r.hset(key, mapping={"seq": 3, "data": _state(3)})
            with pytest.raises(StaleWriteError, match="previous state is gone"):
                await states.start_of(stream, 3)
            assert (await states.start_of(stream, 4)).state.blocks_done == 3
            await states.save(stream, 4, DecoderStreamState(blocks_done=4))
            assert (await states.get(stream))[::2] == (4, 3, 2)  # seq, prev_seq, schema
            # and what this release wrote, release 1 reads: seq and data under their old names
            assert int(await r.hget(key, "seq")) == 4
            assert DecoderStreamState.from_bytes(await r.hget(key, "data")).blocks_done == 4
        finally:
            await r.aclose()

    asyncio.run(body())


def test_decoder_state_of_a_newer_release_fails_clearly_and_is_left_alone(redis_url):
    async def body():
        r = connect_redis(redis_url)
        ns = "up" + uuid.uuid4().hex[:8]
        states = DecoderStateStore(r, namespace=ns)
        key = keys.decoder_state_key(ns, "s")
        try:
            await r.hset(key, mapping={"schema": 3, "seq": 0, "data": b"future"})
            with pytest.raises(UnknownSchema, match="schema version 3"):
                await states.get("s")
            with pytest.raises(UnknownSchema, match="schema version 3"):
                await states.put("s", 1, b"x")
            assert await r.hgetall(key) == {b"schema": b"3", b"seq": b"0", b"data": b"future"}
        finally:
            await r.aclose()

    asyncio.run(body())
