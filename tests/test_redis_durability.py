"""Redis outcomes that are not clean failures (issue 12, item 6), on real redis-servers run as the
product runs them (devcluster/redis_local.py: AOF, appendfsync everysec, maxmemory, noeviction):

* a write that times out but lands (CLIENT PAUSE; a SIGSTOP'd Redis that runs it after the client
  gave up): the script recognises its own replay, no duplicate and no missing turn;
* Redis killed with -9 and restarted from its AOF mid-call: only the turn in flight may fail;
* an acknowledged turn that Redis really lost (restarted from an AOF copy taken before it): the
  call re-reads the counter and goes on, no later turn is ABORTED;
* a full Redis: new calls get RESOURCE_EXHAUSTED, calls already running keep committing turns.

The turn-level path is the gateway's own code: Call._begin_turn and Call._commit on a real store
(the Call's other dependencies are not used by them and are left out).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import uuid
from types import SimpleNamespace

import grpc
import pytest

from vitaserve.common import keys
from vitaserve.common.session_store import (SessionConfig, SessionStore, StoreFull,
                                            StoreUnavailable, connect_redis)
from vitaserve.devcluster.redis_local import LocalRedis, redis_command
from vitaserve.gateway.answer import AnswerProgress
from vitaserve.gateway.call import Call
from vitaserve.gateway.convert import call_status, turn_status

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")

CFG = SessionConfig(mode="boost", codec="mulaw", sample_rate=8000, system_prompt="Be brief.")


@pytest.fixture
def redis(tmp_path):
    r = LocalRedis(tmp_path / "redis").start()
    try:
        yield r
    finally:
        r.stop()


def store_on(url: str, timeout_s: float = 0.5, **kw) -> SessionStore:
    return SessionStore(connect_redis(url, timeout_s=timeout_s), namespace="t" + uuid.uuid4().hex[:12], **kw)


async def new_call(store: SessionStore) -> Call:
    """A gateway Call with its session created, as Call._open leaves it."""
    call = Call(SimpleNamespace(settings=SimpleNamespace(replica_id="gw-test"), store=store))
    call.session_id = await store.create(CFG, owner=call.owner)
    return call


async def call_turn(call: Call, text: str = "") -> int:
    """One turn as Call._answer stores it: begin (with its counter re-read), then commit what was heard."""
    turn = await call._begin_turn()
    progress = AnswerProgress(generated=[7, 8, 9], delivered_upto=3, text=text or f"answer {turn}")
    await call._commit(turn, [1, 2, 3], progress, interrupted=False)
    return turn


async def consistent_history(store: SessionStore, session_id: str) -> list[int]:
    """The turn numbers of the history, after checking what any reader relies on: strictly
    increasing (no duplicate), the counter at the last one, no turn left open."""
    rec = await store.get(session_id)
    numbers = [t.turn for t in rec.history]
    assert numbers == sorted(set(numbers)), numbers
    assert rec.status == "active" and rec.turn == numbers[-1], (rec.status, rec.turn, numbers)
    return numbers


async def evalsha_calls(admin) -> int:
    stats = await admin.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


# ---- the bundled Redis -----------------------------------------------------------------------------

def test_bundled_redis_persists_with_everysec_and_never_evicts(redis):
    """What `vita-audio up` and the tests run: AOF on, fsync once a second, a memory limit, no
    eviction (a session must never vanish silently)."""
    cmd = redis_command(redis.port, redis.workdir)
    assert cmd[cmd.index("--appendonly") + 1] == "yes"

    async def body():
        admin = connect_redis(redis.url)
        try:
            return {k: next(iter((await admin.config_get(k)).values())) for k in
                    ("appendonly", "appendfsync", "maxmemory", "maxmemory-policy", "save")}
        finally:
            await admin.aclose()

    config = asyncio.run(body())
    assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
    assert config["maxmemory-policy"] == "noeviction" and int(config["maxmemory"]) > 0
    assert (redis.workdir / "appendonlydir").is_dir()


# ---- a write that times out but lands ---------------------------------------------------------------

def test_a_commit_held_by_client_pause_is_retried_and_lands_once(redis):
    """CLIENT PAUSE WRITE just before a commit: the client's attempts time out (socket timeout
    0.2 s) until the pause (0.6 s) ends; the retry lands the commit once, the next turn works."""
    retried = []

    async def body():
        store = store_on(redis.url, timeout_s=0.2, retry_attempts=8, retry_max_s=4.0,
                         on_retry=lambda what, n, exc: retried.append((what, type(exc).__name__)))
        admin = connect_redis(redis.url)
        try:
            call = await new_call(store)
            await call_turn(call)
            turn = await call._begin_turn()
            await admin.execute_command("CLIENT", "PAUSE", 600, "WRITE")
            await call._commit(turn, [4, 5], AnswerProgress(generated=[6], delivered_upto=1), interrupted=False)
            assert await call_turn(call) == 3
            return await consistent_history(store, call.session_id)
        finally:
            await admin.aclose()
            await store.redis.aclose()

    assert asyncio.run(body()) == [1, 2, 3]
    assert ("commit a turn", "TimeoutError") in retried


def test_a_commit_that_lands_after_the_client_gave_up_is_recognised_as_its_own(redis):
    """Redis stopped (SIGSTOP) just before a commit: the first attempt times out but its command
    waits in the socket and runs when Redis continues; the retry replays the same op id and is
    answered `done`, not `stale`: the script ran twice, the turn is in the history once."""
    retried = []

    async def body():
        store = store_on(redis.url, timeout_s=0.2, retry_attempts=8, retry_max_s=4.0,
                         on_retry=lambda what, n, exc: retried.append(what))
        admin = connect_redis(redis.url)
        try:
            call = await new_call(store)
            await call_turn(call)
            turn = await call._begin_turn()
            before = await evalsha_calls(admin)
            redis.kill(signal.SIGSTOP)
            asyncio.get_running_loop().call_later(0.8, redis.kill, signal.SIGCONT)
            await call._commit(turn, [4, 5], AnswerProgress(generated=[6], delivered_upto=1), interrupted=False)
            ran = await evalsha_calls(admin) - before
            assert await call_turn(call) == 3
            return ran, await consistent_history(store, call.session_id)
        finally:
            await admin.aclose()
            await store.redis.aclose()

    ran, history = asyncio.run(body())
    assert "commit a turn" in retried and ran >= 2, (retried, ran)
    assert history == [1, 2, 3]


def test_a_commit_that_lands_after_the_retry_budget_is_spent_does_not_break_the_call(redis):
    """Redis stopped for longer than the retry budget: the commit fails (UNAVAILABLE, only that
    turn) but lands when Redis continues. The next turn finds the counter ahead of the call,
    re-reads it and goes on: no duplicate, no missing turn, no ABORTED."""
    async def body():
        store = store_on(redis.url, timeout_s=0.2, retry_attempts=3, retry_max_s=0.6)
        try:
            call = await new_call(store)
            await call_turn(call)
            turn = await call._begin_turn()
            redis.kill(signal.SIGSTOP)
            try:
                with pytest.raises(StoreUnavailable) as failed:
                    await call._commit(turn, [4], AnswerProgress(generated=[6], delivered_upto=1), interrupted=False)
            finally:
                redis.kill(signal.SIGCONT)
            assert turn_status(failed.value)[0] == grpc.StatusCode.UNAVAILABLE
            assert call.turns_done == 1  # the call does not know its commit landed
            assert await call_turn(call) == 3
            return await consistent_history(store, call.session_id)
        finally:
            await store.redis.aclose()

    assert asyncio.run(body()) == [1, 2, 3]


# ---- kill -9 and restart from the AOF ---------------------------------------------------------------

def test_redis_killed_mid_call_restarts_from_its_aof_and_the_call_goes_on(redis):
    """kill -9 between a turn's begin and its commit, restarted at once (same port, same folder):
    the commit reconnects and lands; killed again and left down, the commit of the next turn fails
    (the only turn in flight), and once Redis is back the turn after it completes. A kill -9 of
    the process loses nothing acknowledged: the AOF is written before Redis replies."""
    async def body():
        store = store_on(redis.url)
        try:
            call = await new_call(store)
            await call_turn(call)
            turn = await call._begin_turn()
            redis.kill(signal.SIGKILL)
            redis.start()
            await call._commit(turn, [4], AnswerProgress(generated=[6], delivered_upto=1), interrupted=False)

            turn = await call._begin_turn()
            redis.kill(signal.SIGKILL)
            with pytest.raises(StoreUnavailable):  # the turn in flight fails
                await call._commit(turn, [4], AnswerProgress(generated=[6], delivered_upto=1), interrupted=False)
            redis.start()
            assert await call_turn(call) == 3  # its number given back by the re-read
            assert await call_turn(call) == 4
            return await consistent_history(store, call.session_id)
        finally:
            await store.redis.aclose()

    assert asyncio.run(body()) == [1, 2, 3, 4]


@pytest.mark.parametrize("lost", ["commit", "begin and commit"])
def test_an_acknowledged_turn_that_redis_lost_does_not_abort_later_turns(redis, lost):
    """What appendfsync everysec allows after a machine crash (or a failover to a replica that had
    not caught up): the last acknowledged writes vanish. Reproduced for real: Redis is restarted
    from a copy of its AOF taken before them. The call goes on from the counter Redis has: the
    lost turn is missing, every later turn completes, the history stays consistent."""
    aof = redis.workdir / "appendonlydir"
    copy = redis.workdir.parent / "aof-before"

    async def body():
        store = store_on(redis.url)
        try:
            call = await new_call(store)
            await call_turn(call)
            if lost == "begin and commit":
                shutil.copytree(aof, copy)  # every acknowledged write is in the file (written before the reply)
            turn = await call._begin_turn()
            if lost == "commit":
                shutil.copytree(aof, copy)
            await call._commit(turn, [4], AnswerProgress(generated=[6], delivered_upto=1), interrupted=False)
            assert call.turns_done == 2
            redis.kill(signal.SIGKILL)
            shutil.rmtree(aof)
            shutil.copytree(copy, aof)
            redis.start()
            assert (await store.get(call.session_id)).history[-1].turn == 1  # turn 2 really is lost
            later = [await call_turn(call) for _ in range(3)]
            return later, await consistent_history(store, call.session_id)
        finally:
            await store.redis.aclose()

    later, history = asyncio.run(body())
    if lost == "commit":  # begun, never committed: abandoned, its number not reused
        assert later == [3, 4, 5] and history == [1, 3, 4, 5]
    else:  # the counter went back: the call continues from it
        assert later == [2, 3, 4] and history == [1, 2, 3, 4]


# ---- a full Redis -----------------------------------------------------------------------------------

async def fill(admin, n: int, size: int = 64 * 1024) -> None:
    """n keys of `size` bytes (64 KiB each: one big value would itself hit maxmemory in the query buffer)."""
    for i in range(n):
        await admin.set(f"filler:{i}", b"x" * size)


def test_a_full_redis_refuses_new_calls_and_running_calls_keep_committing(redis):
    """maxmemory set so that Redis is past the new-session fraction (80 %) but not full: a new
    call is refused with RESOURCE_EXHAUSTED and a message a person understands, while a call
    already running keeps committing turns. Then really full (OOM): a running call's commit fails
    alone with RESOURCE_EXHAUSTED, nothing of it lands, its history can still be read, and once
    there is room again the call goes on."""
    async def body():
        store = store_on(redis.url)
        admin = connect_redis(redis.url)
        try:
            running = await new_call(store)
            await call_turn(running)
            await fill(admin, 64)  # ~4 MiB, so that client buffers (~20 KiB each) are noise
            used = (await admin.info("memory"))["used_memory"]
            # used at 90 % of the limit: above the 80 % kept for running calls, ~450 KiB below OOM
            await admin.config_set("maxmemory", int(used / 0.9))
            await asyncio.sleep(keys.MEMORY_CHECK_S)  # the store's cached reading expires

            with pytest.raises(StoreFull) as refused:
                await store.create(CFG, owner="gw-test:new")
            code, message = call_status(refused.value)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "at capacity" in message and "try again later" in message and "maxmemory" not in message
            for _ in range(3):  # ~1 KiB each: well inside the headroom
                await call_turn(running)

            used = (await admin.info("memory"))["used_memory"]
            await admin.config_set("maxmemory", used - 256 * 1024)  # OOM: every write refused
            before = await store.get(running.session_id)
            with pytest.raises(StoreFull) as full:
                await running._begin_turn()
            assert turn_status(full.value)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
            after = await store.get(running.session_id)  # reads still work (a script, not MULTI)
            assert (after.turn, after.status, after.history) == (before.turn, before.status, before.history)

            await admin.config_set("maxmemory", 64 * 1024 * 1024)
            assert await call_turn(running) == 5
            return await consistent_history(store, running.session_id)
        finally:
            await admin.aclose()
            await store.redis.aclose()

    assert asyncio.run(body()) == [1, 2, 3, 4, 5]


def test_a_commit_refused_for_memory_lands_nothing_and_the_next_turn_works(redis):
    """A turn begun while there was room, its commit refused by a full Redis: RESOURCE_EXHAUSTED
    for that turn, the history untouched; with room again the next turn re-reads the counter
    (the turn left open is given back) and completes."""
    async def body():
        store = store_on(redis.url)
        admin = connect_redis(redis.url)
        try:
            call = await new_call(store)
            await call_turn(call)
            turn = await call._begin_turn()
            used = (await admin.info("memory"))["used_memory"]
            await admin.config_set("maxmemory", used - 256 * 1024)
            with pytest.raises(StoreFull):
                await call._commit(turn, [4], AnswerProgress(generated=[6], delivered_upto=1), interrupted=False)
            rec = await store.get(call.session_id)
            assert [t.turn for t in rec.history] == [1] and (rec.turn, rec.status) == (2, "in_turn")
            await admin.config_set("maxmemory", 64 * 1024 * 1024)
            assert await call_turn(call) == 2
            return await consistent_history(store, call.session_id)
        finally:
            await admin.aclose()
            await store.redis.aclose()

    assert asyncio.run(body()) == [1, 2]


def test_a_redis_that_refuses_info_does_not_refuse_new_sessions(redis):
    """A managed Redis may deny INFO (an ACL): the store then only relies on Redis's own OOM."""
    async def body():
        admin = connect_redis(redis.url)
        await admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "+@all", "-info")
        store = SessionStore(connect_redis(f"redis://app:pw@127.0.0.1:{redis.port}/0"), namespace="acl")
        try:
            sid = await store.create(CFG, owner="o")
            return (await store.get(sid)).owner
        finally:
            await admin.aclose()
            await store.redis.aclose()

    assert asyncio.run(body()) == "o"
