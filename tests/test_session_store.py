"""Session store and decoder state store against a real redis-server (no mocks): round trips, TTLs,
fencing, claims, decoder state seq fencing and atomic writes, Redis down, trimming and size limits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from vitaserve.common import keys
from vitaserve.devcluster.processes import free_port
from vitaserve.common.session_store import (
    RecordTooLarge,
    SessionConfig,
    SessionEnded,
    SessionInputError,
    SessionNotFound,
    SessionStore,
    StaleWriteError,
    StoreUnavailable,
    TurnRecord,
    connect_redis,
)
from vitaserve.decoder.state_store import DecoderStateStore

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")

CFG = SessionConfig(mode="boost", codec="mulaw", sample_rate=8000, system_prompt="Be brief.")


def start_redis(workdir, port: int) -> subprocess.Popen:
    """Start redis-server and return once it logs that it accepts connections (an event)."""
    os.makedirs(workdir, exist_ok=True)
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Ready to accept connections" in line:
            return proc
    proc.wait()
    raise RuntimeError("redis-server did not start:\n" + "".join(lines))


def stop_redis(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)  # in case a test stopped it
        proc.terminate()
        proc.wait(timeout=10)
    proc.stdout.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    port = free_port()
    proc = start_redis(tmp_path_factory.mktemp("redis"), port)
    yield f"redis://127.0.0.1:{port}/0"
    stop_redis(proc)


@contextlib.asynccontextmanager
async def open_store(url: str, **kw):
    """A store in a fresh namespace (tests never see each other's keys) and a raw client."""
    r = connect_redis(url, timeout_s=kw.pop("timeout_s", 2.0))
    try:
        yield SessionStore(r, namespace="t" + uuid.uuid4().hex[:12], **kw), r
    finally:
        await r.aclose()


def turn(n: int, text: str = "", interrupted: bool = False) -> TurnRecord:
    return TurnRecord(turn=n, user_audio=[n, 16383, 0], assistant_ids=[151665, n, 168071],
                      text=text or f"answer {n}", interrupted=interrupted)


async def play_turns(store: SessionStore, sid: str, owner: str, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        t = await store.begin_turn(sid, i, owner)
        assert t == i + 1
        await store.commit_turn(sid, t, turn(t), owner)


def test_create_get_history_round_trip(redis_url):
    async def body():
        async with open_store(redis_url) as (store, _):
            sid = await store.create(CFG, owner="gw-a/1")
            assert len(sid) == 32 and int(sid, 16) >= 0
            rec = await store.get(sid)
            assert rec.config == CFG and rec.turn == 0 and rec.status == "active"
            assert rec.owner == "gw-a/1" and rec.fence == 0 and rec.history == []
            assert rec.created_at == rec.updated_at > 1.6e9

            t = await store.begin_turn(sid, 0, "gw-a/1")
            assert t == 1 and (await store.get(sid)).status == "in_turn"
            first = TurnRecord(turn=1, user_audio=list(range(0, 16384, 97)), assistant_ids=[5, 6],
                               text="héllo 你好", interrupted=True)
            await store.commit_turn(sid, 1, first, "gw-a/1")
            await play_turns(store, sid, "gw-a/1", 1, start=1)

            rec = await store.get(sid)
            assert rec.turn == 2 and rec.status == "active" and rec.updated_at >= rec.created_at
            assert rec.history == [first, turn(2)]
            assert await store.history(sid) == [first, turn(2)]
            assert await store.get(uuid.uuid4().hex) is None

    asyncio.run(body())


def test_every_key_has_a_ttl_and_every_write_refreshes_it(redis_url):
    async def body():
        async with open_store(redis_url, session_ttl_s=600) as (store, r):
            states = DecoderStateStore.beside(store, ttl_s=60)
            sid = await store.create(CFG, owner="o")
            await play_turns(store, sid, "o", 1)
            await states.put("s1", 0, b"x")
            found = [k async for k in r.scan_iter(match=f"{store.namespace}:*")]
            assert len(found) == 3  # session hash, history list, decoder state
            for k in found:
                ttl = await r.pttl(k)
                limit = 60_000 if b":decoder:" in k else 600_000
                assert 0 < ttl <= limit, (k, ttl)

            hkey, lkey = store._keys(sid)
            writes = [
                lambda: store.begin_turn(sid, 1, "o"),
                lambda: store.commit_turn(sid, 2, turn(2), "o"),
                lambda: store.claim(sid, "o2"),
                lambda: store.touch(sid),
            ]
            for write in writes:
                for k in (hkey, lkey):
                    assert await r.pexpire(k, 5000)
                await write()
                for k in (hkey, lkey):
                    assert 5000 < await r.pttl(k) <= 600_000
            await store.end(sid, owner="o2")  # the end shortens both to ENDED_SESSION_TTL_S
            for k in (hkey, lkey):
                assert 0 < await r.pttl(k) <= keys.ENDED_SESSION_TTL_S * 1000

            dkey = keys.decoder_state_key(store.namespace, "s1")
            assert await r.pexpire(dkey, 5000)
            await states.put("s1", 1, b"y")
            assert 5000 < await r.pttl(dkey) <= 60_000

    asyncio.run(body())


def test_concurrent_writers_exactly_one_wins_and_history_is_intact(redis_url):
    async def body():
        async with open_store(redis_url) as (store, _):
            sid = await store.create(CFG, owner="gw")
            await play_turns(store, sid, "gw", 2)

            # Eight writers (a retry, a duplicate task) race to begin turn 3.
            res = await asyncio.gather(*(store.begin_turn(sid, 2, "gw") for _ in range(8)),
                                       return_exceptions=True)
            assert res.count(3) == 1
            assert all(isinstance(x, StaleWriteError) for x in res if x != 3)

            # Eight writers race to commit turn 3, each with a different record.
            recs = [turn(3, text=f"writer {i}") for i in range(8)]
            res = await asyncio.gather(*(store.commit_turn(sid, 3, rec, "gw") for rec in recs),
                                       return_exceptions=True)
            winners = [i for i, x in enumerate(res) if x is None]
            assert len(winners) == 1
            assert all(isinstance(x, StaleWriteError) for x in res if x is not None)
            assert "already committed" in str(next(x for x in res if x is not None))

            rec = await store.get(sid)
            assert rec.turn == 3 and rec.status == "active"
            assert rec.history == [turn(1), turn(2), recs[winners[0]]]

    asyncio.run(body())


def test_claim_by_a_new_owner_fences_out_the_old_one(redis_url):
    async def body():
        async with open_store(redis_url) as (store, _):
            sid = await store.create(CFG, owner="gw-a/1")
            await play_turns(store, sid, "gw-a/1", 1)
            assert await store.begin_turn(sid, 1, "gw-a/1") == 2  # replica A dies mid-turn 2

            rec = await store.claim(sid, "gw-b/7")
            assert (rec.owner, rec.fence, rec.status, rec.turn) == ("gw-b/7", 1, "active", 2)
            assert rec.history == [turn(1)] and rec.config == CFG

            with pytest.raises(StaleWriteError, match="owned by 'gw-b/7'"):
                await store.commit_turn(sid, 2, turn(2), "gw-a/1")
            with pytest.raises(StaleWriteError):
                await store.begin_turn(sid, 2, "gw-a/1")
            with pytest.raises(StaleWriteError):
                await store.end(sid, owner="gw-a/1")

            # B continues; the abandoned turn 2 is never reused.
            assert await store.begin_turn(sid, 2, "gw-b/7", fence=rec.fence) == 3
            await store.commit_turn(sid, 3, turn(3), "gw-b/7", fence=rec.fence)

            # The same owner string claiming again still fences out its older handler.
            again = await store.claim(sid, "gw-b/7")
            assert again.fence == 2
            with pytest.raises(StaleWriteError, match="fence is now 2"):
                await store.begin_turn(sid, 3, "gw-b/7", fence=1)
            assert await store.history(sid) == [turn(1), turn(3)]

    asyncio.run(body())


def test_unknown_malformed_and_ended_sessions(redis_url):
    async def body():
        async with open_store(redis_url) as (store, _):
            ghost = uuid.uuid4().hex
            assert await store.get(ghost) is None
            calls = [
                store.history(ghost), store.begin_turn(ghost, 0, "o"),
                store.commit_turn(ghost, 1, turn(1), "o"), store.claim(ghost, "o"),
                store.end(ghost), store.touch(ghost),
            ]
            for call in calls:
                with pytest.raises(SessionNotFound, match=ghost):
                    await call
            for bad in ("not-a-session", ghost.upper(), "a{b}" * 8, 42):
                with pytest.raises(SessionInputError):
                    await store.get(bad)

            sid = await store.create(CFG)  # no owner yet: writes need a claim first
            with pytest.raises(StaleWriteError, match="no owner yet"):
                await store.begin_turn(sid, 0, "o")
            await store.claim(sid, "o")
            await play_turns(store, sid, "o", 1)
            await store.end(sid, owner="o")
            await store.end(sid)  # idempotent
            assert (await store.get(sid)).status == "ended"
            with pytest.raises(SessionEnded):
                await store.begin_turn(sid, 1, "o")
            with pytest.raises(SessionEnded):
                await store.claim(sid, "o2")
            assert await store.history(sid) == [turn(1)]  # readable until it expires, soon
            for key in store._keys(sid):
                assert 0 < await store.redis.pttl(key) <= keys.ENDED_SESSION_TTL_S * 1000

    asyncio.run(body())


def test_retried_script_after_a_lost_reply_is_not_a_conflict(redis_url):
    """Replay the exact script call (same op id), as tenacity does after a lost reply."""

    async def body():
        async with open_store(redis_url) as (store, _):
            sid = await store.create(CFG, owner="o")
            k = store._keys(sid)
            args = [0, "o", "", "op-1", store.session_ttl_ms]
            first = await store._run("begin", "begin_turn", k, args)
            replay = await store._run("begin", "begin_turn", k, args)
            assert (first[0], first[1], replay[0], replay[1]) == (b"ok", 1, b"done", 1)
            other = await store._run("begin", "begin_turn", k, [0, "o", "", "op-2", 1000])
            assert other[0] == b"stale"

            rec = turn(1).to_json()
            cargs = [1, "o", "", "op-3", store.session_ttl_ms, rec, 10]
            assert (await store._run("c", "commit_turn", k, cargs))[0] == b"ok"
            assert (await store._run("c", "commit_turn", k, cargs))[0] == b"done"
            assert await store.history(sid) == [turn(1)]

    asyncio.run(body())


def test_decoder_state_seq_fencing(redis_url):
    async def body():
        async with open_store(redis_url) as (store, _):
            states = DecoderStateStore.beside(store)
            blob = bytes(range(256)) * 1200  # ~300 KB, every byte value
            assert await states.get("call-1:turn-1") is None
            await states.put("call-1:turn-1", 0, blob)
            assert (await states.get("call-1:turn-1"))[:2] == (0, blob)

            with pytest.raises(StaleWriteError, match="holds seq 0"):
                await states.put("call-1:turn-1", 2, b"too early")
            with pytest.raises(StaleWriteError):
                await states.put("call-1:turn-1", 0, b"restart over it")
            assert (await states.get("call-1:turn-1"))[:2] == (0, blob)

            await states.put("call-1:turn-1", 1, blob[::-1])
            await states.put("call-1:turn-1", 1, blob[::-1])  # a retry: accepted
            with pytest.raises(StaleWriteError, match="holds seq 1"):
                await states.put("call-1:turn-1", 1, b"another replica")
            assert (await states.get("call-1:turn-1"))[:2] == (1, blob[::-1])
            # the state before block 1 is kept beside it, for a retry of block 1
            assert (await states.get("call-1:turn-1"))[2:4] == (0, blob)

            with pytest.raises(SessionNotFound, match="no stored state"):
                await states.put("never-started", 3, b"x")
            await states.delete("call-1:turn-1")
            assert await states.get("call-1:turn-1") is None
            await states.delete("call-1:turn-1")  # idempotent

            for bad_id in ("", "has space", "{tag}", "x" * 129, "ends:prev"):
                with pytest.raises(SessionInputError):
                    await states.put(bad_id, 0, b"x")
            await states.put("x" * 128, 0, b"x")  # the longest id: no room kept for a suffix
            for bad_seq in (-1, 1.0, True):
                with pytest.raises(SessionInputError):
                    await states.put("s", bad_seq, b"x")
            with pytest.raises(SessionInputError):
                await states.put("s", 0, "not bytes")

    asyncio.run(body())


def test_decoder_state_write_is_one_atomic_script_on_one_key(redis_url):
    """One key per stream and one command per write: the new state and the previous one land
    together or not at all. A client that dies right after its write (the reply lost) leaves a
    consistent record, which its retry recognises and a block retried later is served from."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from vitaserve.decoder.stream_state import DecoderStreamState

    def state(n: int) -> DecoderStreamState:
        import torch

        return DecoderStreamState(blocks_done=n, prompt_tokens=torch.arange(n * 10, dtype=torch.int32))

    async def body():
        async with open_store(redis_url) as (store, r):
            states = DecoderStateStore.beside(store)
            sent, die_after_write = [], []
            real = r.execute_command

            async def spy(*args, **options):
                sent.append(args[0].upper() if isinstance(args[0], str) else args[0])
                reply = await real(*args, **options)
                if die_after_write and args[0].upper() == "EVALSHA":
                    die_after_write.pop()
                    raise RedisConnectionError("client died after its write reached Redis")
                return reply

            r.execute_command = spy
            await states.put("warm", 0, b"loads the script")  # the first call may also SCRIPT LOAD
            for seq in range(3):
                sent.clear()
                saved = await states.save("call:t1", seq, state(seq))
                assert saved.written and saved.size > 0
                assert sent == ["EVALSHA"], sent  # one command, no separate write of the previous
            assert [k async for k in r.scan_iter(match=f"{store.namespace}:decoder:*call:t1*")] == [
                keys.decoder_state_key(store.namespace, "call:t1").encode()]
            raw = await r.hgetall(keys.decoder_state_key(store.namespace, "call:t1"))
            assert sorted(raw) == [b"data", b"prev_data", b"prev_seq", b"schema", b"seq"]
            assert (raw[b"schema"], raw[b"seq"], raw[b"prev_seq"]) == (b"2", b"2", b"1")
            assert [DecoderStreamState.from_bytes(raw[f]).blocks_done for f in (b"data", b"prev_data")] == [2, 1]

            # The client dies after block 3's write: the retry finds its own write ("done").
            sent.clear()
            die_after_write.append(True)
            assert (await states.save("call:t1", 3, state(3))).written
            assert sent == ["EVALSHA", "EVALSHA"]
            stored = await states.get("call:t1")
            assert (stored.seq, stored.prev_seq, stored.prev_data, stored.schema) == (3, 2, raw[b"data"], 2)
            assert DecoderStreamState.from_bytes(stored.data).blocks_done == 3

            # A fresh replica asked for block 3 again serves it from the previous state.
            other = DecoderStateStore.beside(store)
            start = await other.start_of("call:t1", 3)
            assert start.retry and start.state.blocks_done == 2
            assert (await other.start_of("call:t1", 4)).state.blocks_done == 3
            assert await states.get("call:t1") == stored  # reads changed nothing

    asyncio.run(body())


def test_history_is_trimmed_to_max_turns(redis_url):
    async def body():
        async with open_store(redis_url, max_turns=3) as (store, r):
            sid = await store.create(CFG, owner="o")
            await play_turns(store, sid, "o", 5)
            rec = await store.get(sid)
            assert rec.turn == 5 and [t.turn for t in rec.history] == [3, 4, 5]
            assert await r.llen(store._keys(sid)[1]) == 3

    asyncio.run(body())


def test_size_limits_and_bad_records_lose_nothing(redis_url):
    async def body():
        async with open_store(redis_url, max_turn_bytes=2000, max_system_prompt_bytes=100) as (store, _):
            states = DecoderStateStore.beside(store, max_state_bytes=1000)
            sid = await store.create(CFG, owner="o")
            await play_turns(store, sid, "o", 1)
            await store.begin_turn(sid, 1, "o")
            big = TurnRecord(turn=2, user_audio=list(range(1000)))
            with pytest.raises(RecordTooLarge, match="over the limit of 2000") as e:
                await store.commit_turn(sid, 2, big, "o")
            assert isinstance(e.value, ValueError)
            with pytest.raises(SessionInputError, match="record is for turn 1"):
                await store.commit_turn(sid, 2, turn(1), "o")
            # Nothing was written: the turn is still open and commits normally.
            assert (await store.get(sid)).status == "in_turn"
            await store.commit_turn(sid, 2, turn(2), "o")
            assert await store.history(sid) == [turn(1), turn(2)]

            with pytest.raises(RecordTooLarge):
                await store.create(SessionConfig("boost", "pcm16", 16000, "é" * 51))
            with pytest.raises(RecordTooLarge):
                await states.put("s", 0, b"\0" * 1001)
            assert await states.get("s") is None

    asyncio.run(body())


@pytest.mark.parametrize("kwargs", [
    dict(turn=0), dict(turn=1, user_audio=[1.5]), dict(turn=1, user_audio=[-1]),
    dict(turn=1, assistant_ids=[True]), dict(turn=1, assistant_ids="123"),
    dict(turn=1, text=None), dict(turn=1, interrupted=1), dict(turn=1, user_audio=[2**31]),
])
def test_bad_turn_records_are_value_errors(kwargs):
    with pytest.raises(ValueError):
        TurnRecord(**kwargs)


@pytest.mark.parametrize("args", [
    ("", "mulaw", 8000), ("boost", "", 8000), ("boost", "mulaw", 0), ("boost", "mulaw", "8000"),
    ("boost", "mulaw", 8000, None),
])
def test_bad_session_configs_are_value_errors(args):
    with pytest.raises(ValueError):
        SessionConfig(*args)


def test_client_with_decoded_responses_is_refused(redis_url):
    import redis.asyncio as aioredis

    with pytest.raises(SessionInputError, match="decode_responses=False"):
        SessionStore(aioredis.Redis.from_url(redis_url, decode_responses=True))
    with pytest.raises(SessionInputError, match="namespace"):
        SessionStore(connect_redis(redis_url), namespace="a{b}")
    with pytest.raises(SessionInputError, match="decode_responses=False"):
        DecoderStateStore(aioredis.Redis.from_url(redis_url, decode_responses=True))


def test_redis_down_fails_fast_with_store_unavailable():
    retries = []

    async def body():
        port = free_port()  # nothing listens there
        r = connect_redis(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
        store = SessionStore(r, retry_attempts=3, retry_max_s=5.0,
                             on_retry=lambda what, n, exc: retries.append((what, n)))
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"create a session \(3 attempts\)"):
            await store.create(CFG, owner="o")
        with pytest.raises(StoreUnavailable):
            await DecoderStateStore.beside(store).get("s")
        elapsed = time.monotonic() - t0
        await r.aclose()
        return elapsed

    elapsed = asyncio.run(body())
    assert elapsed < 3.0
    assert [n for what, n in retries if what == "create a session"] == [1, 2]


def test_redis_killed_or_hung_mid_call(tmp_path):
    port = free_port()
    proc = start_redis(tmp_path / "r", port)

    async def body():
        r = connect_redis(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
        store = SessionStore(r, retry_attempts=2, retry_max_s=2.0)
        try:
            sid = await store.create(CFG, owner="o")
            await play_turns(store, sid, "o", 1)
            proc.send_signal(signal.SIGSTOP)  # hung: connects, never answers -> timeouts
            with pytest.raises(StoreUnavailable, match="TimeoutError"):
                await store.begin_turn(sid, 1, "o")
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            proc.wait(timeout=10)
            with pytest.raises(StoreUnavailable, match="ConnectionError"):
                await store.get(sid)
        finally:
            await r.aclose()

    try:
        asyncio.run(body())
    finally:
        stop_redis(proc)


def test_transient_failure_is_retried_until_redis_is_back(tmp_path):
    """The first attempt finds no Redis; the retry hook starts one; the write then succeeds."""
    port = free_port()
    procs = []

    def bring_redis_up(what, attempt, exc):
        if not procs:
            procs.append(start_redis(tmp_path / "late", port))

    async def body():
        r = connect_redis(f"redis://127.0.0.1:{port}/0", timeout_s=1.0)
        store = SessionStore(r, retry_attempts=3, on_retry=bring_redis_up)
        try:
            sid = await store.create(CFG, owner="o")
            assert (await store.get(sid)).owner == "o"
        finally:
            await r.aclose()

    try:
        asyncio.run(body())
        assert len(procs) == 1
    finally:
        for p in procs:
            stop_redis(p)


def test_abort_turn_gives_the_number_back_and_only_to_its_owner(redis_url):
    """A turn that failed with nothing heard: the counter returns to the last committed turn, the
    next turn reuses the number (no gap in the history); a stale owner or turn cannot abort."""
    async def body():
        async with open_store(redis_url) as (store, _):
            sid = await store.create(CFG, owner="gw-a/1")
            await play_turns(store, sid, "gw-a/1", 1)
            t = await store.begin_turn(sid, 1, "gw-a/1")
            with pytest.raises(StaleWriteError) as err:
                await store.abort_turn(sid, t, "gw-b/9")
            assert err.value.what == "owner"
            with pytest.raises(StaleWriteError):
                await store.abort_turn(sid, t + 1, "gw-a/1")
            assert await store.abort_turn(sid, t, "gw-a/1") == 1
            rec = await store.get(sid)
            assert rec.turn == 1 and rec.status == "active"
            with pytest.raises(StaleWriteError) as err:  # nothing in progress any more
                await store.abort_turn(sid, t, "gw-a/1")
            assert err.value.what == "turn"
            await play_turns(store, sid, "gw-a/1", 1, start=1)
            assert [h.turn for h in await store.history(sid)] == [1, 2]

    asyncio.run(body())


def cut(n: int, assistant_ids: list[int], text: str = "heard") -> TurnRecord:
    """turn(n) as the caller heard it: a prefix of its answer, marked interrupted."""
    return TurnRecord(turn=n, user_audio=turn(n).user_audio, assistant_ids=assistant_ids, text=text,
                      interrupted=True)


def test_cut_turn_shortens_only_the_last_turn_and_only_by_its_owner(redis_url):
    """A finished answer barged in on while still playing: the last stored turn becomes the heard
    prefix, marked interrupted; an earlier turn, an open turn, another owner or a stale fence is refused
    and changes nothing."""
    async def body():
        async with open_store(redis_url) as (store, _):
            sid = await store.create(CFG, owner="gw-a/1")
            await play_turns(store, sid, "gw-a/1", 2)
            before = await store.history(sid)

            with pytest.raises(StaleWriteError) as err:  # not the last turn
                await store.cut_turn(sid, cut(1, [151665]), "gw-a/1")
            assert err.value.what == "turn"
            with pytest.raises(StaleWriteError) as err:  # another owner
                await store.cut_turn(sid, cut(2, [151665]), "gw-b/9")
            assert err.value.what == "owner"
            with pytest.raises(StaleWriteError) as err:  # a fence that moved on
                await store.cut_turn(sid, cut(2, [151665]), "gw-a/1", fence=7)
            assert err.value.what == "fence"
            with pytest.raises(SessionInputError, match="interrupted"):
                await store.cut_turn(sid, TurnRecord(turn=2, assistant_ids=[151665]), "gw-a/1")
            assert await store.history(sid) == before

            await store.cut_turn(sid, cut(2, [151665, 2]), "gw-a/1")
            assert await store.history(sid) == [before[0], cut(2, [151665, 2])]
            rec = await store.get(sid)
            assert (rec.turn, rec.status) == (2, "active")

            # the next turn began: turn 2 is no longer the one playing, it cannot be cut any more
            t = await store.begin_turn(sid, 2, "gw-a/1")
            with pytest.raises(StaleWriteError) as err:
                await store.cut_turn(sid, cut(2, [151665]), "gw-a/1")
            assert err.value.what == "turn"
            with pytest.raises(StaleWriteError) as err:  # turn 3 is open, not committed
                await store.cut_turn(sid, cut(3, [151665]), "gw-a/1")
            assert err.value.what == "open"
            await store.commit_turn(sid, t, turn(3), "gw-a/1")

            # a claim by another replica fences the old owner out
            claimed = await store.claim(sid, "gw-b/9")
            with pytest.raises(StaleWriteError) as err:
                await store.cut_turn(sid, cut(3, [151665]), "gw-a/1")
            assert err.value.what == "owner"
            await store.cut_turn(sid, cut(3, [151665]), "gw-b/9", fence=claimed.fence)
            assert (await store.history(sid))[-1] == cut(3, [151665])

            await store.end(sid)
            with pytest.raises(SessionEnded):
                await store.cut_turn(sid, cut(3, []), "gw-b/9")
            with pytest.raises(SessionNotFound):
                await store.cut_turn(uuid.uuid4().hex, cut(1, []), "gw-b/9")

    asyncio.run(body())


def test_cut_turn_never_grows_or_rewrites_a_turn(redis_url):
    """A cut keeps a prefix of the stored assistant ids and the same user audio; anything else is
    refused with nothing written."""
    async def body():
        async with open_store(redis_url) as (store, _):
            sid = await store.create(CFG, owner="o")
            await play_turns(store, sid, "o", 1)
            stored = turn(1)  # assistant_ids [151665, 1, 168071]
            for bad in (cut(1, stored.assistant_ids + [5]),           # longer
                        cut(1, [151665, 2]),                          # not a prefix
                        cut(1, [99]),
                        TurnRecord(turn=1, user_audio=[1, 16383], assistant_ids=[151665],
                                   interrupted=True),                 # other user audio
                        TurnRecord(turn=1, user_audio=[1, 16383, 0, 5], assistant_ids=[151665],
                                   interrupted=True)):
                with pytest.raises(SessionInputError, match="prefix of the stored answer"):
                    await store.cut_turn(sid, bad, "o")
                assert await store.history(sid) == [stored]
            # the whole answer (nothing cut off) is allowed: it only marks the turn interrupted
            await store.cut_turn(sid, cut(1, stored.assistant_ids), "o")
            await store.cut_turn(sid, cut(1, []), "o")  # nothing of the answer was heard
            assert await store.history(sid) == [cut(1, [])]
            with pytest.raises(SessionInputError):  # and it cannot grow back
                await store.cut_turn(sid, cut(1, [151665]), "o")

    asyncio.run(body())


def test_cut_turn_retried_after_a_lost_reply_is_done_not_a_conflict(redis_url):
    """Replay the exact script call (same op id) after the cut landed: 'done', the history as the
    first call left it; another writer's op in between makes the replay stale."""
    async def body():
        async with open_store(redis_url, store_text=False) as (store, _):
            sid = await store.create(CFG, owner="o")
            await play_turns(store, sid, "o", 1)
            k = store._keys(sid)
            args = [1, "o", "", "op-cut", store.session_ttl_ms, cut(1, [151665]).to_json()]
            assert (await store._run("cut", "cut_turn", k, args))[0] == b"ok"
            assert (await store._run("cut", "cut_turn", k, args))[0] == b"done"
            assert await store.history(sid) == [cut(1, [151665])]
            await store.cut_turn(sid, cut(1, [], text="not kept"), "o")  # another op: --no-store-text drops text
            assert await store.history(sid) == [cut(1, [], text="")]
            assert (await store._run("cut", "cut_turn", k, args))[0] == b"grows"  # not 'done' any more

    asyncio.run(body())
