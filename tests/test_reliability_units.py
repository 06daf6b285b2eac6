"""Regression tests of the reliability issue's call-breakers, at the unit level (the same items
against real servers are in test_reliability_e2e.py): bounded mode parsing, validated sampling
values, engine rows that fail alone, prompts trimmed to the context, failures unwrapped."""

from __future__ import annotations

import asyncio
import math
import random
import time

import pytest

from vitaserve.generator.generate import generate
from vitaserve.lmtext.sampling_params import SamplingParams
from vitaserve.lmtext.schedule import Schedule

GREEDY = SamplingParams(repetition_penalty=1.05)


# ---- item 3: a mode from a caller is parsed in time independent of its counts -----------------------
@pytest.mark.parametrize("mode", ["1,1,1000000000000,1", "1,10," * 31 + "8193,1", "1," * 200 + "1",
                                  "9" * 5000, "1,-1", "0,1", "1,10,0,0"])
def test_hostile_modes_are_refused_fast(mode):
    start = time.perf_counter()
    with pytest.raises(ValueError):
        Schedule.parse(mode, 10)
    assert time.perf_counter() - start < 0.1


def test_longest_mctp_run_equals_walking_the_schedule():
    """The closed form that replaced walking the steps agrees with the walk on every small schedule."""
    rng = random.Random(0)
    for _ in range(400):
        n = rng.randint(1, 4)
        pairs = [rng.randint(0, 3) for _ in range(2 * n)]
        pairs[0], pairs[-2] = max(1, pairs[0]), max(1, pairs[-2])  # as parse() demands
        pairs = tuple(pairs)
        sched = Schedule(pairs)
        walked = max(len(r) for r in sched.kinds(sched.head_length() + 2 * sum(pairs[-2:])).split("M"))
        assert sched.longest_mctp_run() == walked, pairs


def test_zero_backbone_pair_joins_mctp_runs():
    with pytest.raises(ValueError, match="11 MCTP steps in a row"):
        Schedule.parse("1,6,0,5,1,1", 10)
    assert Schedule.parse("1,5,0,5,1,1", 10).longest_mctp_run() == 10


# ---- item 2: sampling values in ranges where fp32 sampling stays finite ------------------------------
@pytest.mark.parametrize("field,value", [
    ("temperature", 1e-45), ("temperature", 1e-38), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", -1.0), ("top_p", math.nan), ("top_p", 0.0), ("top_p", 1.5),
    ("repetition_penalty", 1e-45), ("repetition_penalty", math.inf), ("repetition_penalty", 0.0),
    ("top_k", -1), ("top_k", 1 << 40), ("seed", 1 << 70),
])
def test_out_of_range_sampling_values_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(do_sample=True, **{field: value}).validated()


def test_greedy_accepts_temperature_zero():
    assert SamplingParams(do_sample=False, temperature=0.0).validated()


def _poisoned(seed: int = 0) -> SamplingParams:
    """What validation now refuses, built past it: the engine must survive it all the same."""
    return SamplingParams(do_sample=True, temperature=1e-45, seed=seed)


def test_a_failing_row_ends_alone_and_the_others_equal_their_offline_tokens(tiny_lm):
    from test_lm_model import random_prompt

    from vitaserve.generator.engine import Engine, Request

    prompts = {rid: random_prompt(tiny_lm, n, seed=n) for rid, n in (("a", 9), ("b", 14), ("c", 6))}
    alone = {rid: [e.token_id for e in generate(tiny_lm, p, "boost", GREEDY, max_new_tokens=25, stop_ids=())]
             for rid, p in prompts.items() if rid != "b"}
    engine = Engine(tiny_lm)
    for rid, p in prompts.items():
        engine.add(Request(rid, p, "boost", _poisoned() if rid == "b" else GREEDY, 25, stop_ids=()))
    got, failed = {"a": [], "c": []}, {}
    while engine.has_work():
        for rid, event in engine.step():
            if isinstance(event, Exception):
                failed[rid] = event
            else:
                got[rid].append(event.token_id)
    assert list(failed) == ["b"]
    assert got == alone
    assert len(engine.free_slots) == tiny_lm.model.num_slots  # the failed row gave its slot back


def test_engine_thread_survives_a_failing_call_and_serves_later_ones(tiny_lm):
    from test_lm_model import random_prompt

    from vitaserve.generator.engine import Request
    from vitaserve.generator.engine_service import EngineService

    prompt = random_prompt(tiny_lm, 9, seed=3)
    alone = [e.token_id for e in generate(tiny_lm, prompt, "turbo", GREEDY, max_new_tokens=15, stop_ids=())]
    service = EngineService(tiny_lm, name="test-engine")
    try:
        results = {}

        def submit(rid, sampling):
            tokens, done = [], asyncio.Event()
            loop = asyncio.get_running_loop()
            results[rid] = (tokens, done)
            service.submit(Request(rid, prompt, "turbo", sampling, 15, stop_ids=()),
                           on_token=lambda e: tokens.append(e.token_id),
                           on_done=lambda err: loop.call_soon_threadsafe(lambda: (results.__setitem__(
                               rid + ":error", err), done.set())))

        async def main():
            submit("bad", _poisoned())
            submit("good", GREEDY)
            await asyncio.wait_for(asyncio.gather(results["bad"][1].wait(), results["good"][1].wait()), 60)
            submit("later", GREEDY)
            await asyncio.wait_for(results["later"][1].wait(), 60)

        asyncio.run(main())
        assert isinstance(results["bad:error"], Exception)
        assert results["good:error"] is None and results["good"][0] == alone
        assert results["later:error"] is None and results["later"][0] == alone
        assert service._thread.is_alive()
    finally:
        service.stop()


# ---- item 4: the prompt keeps the system prompt and the newest whole turns that fit ---------------
def test_prompt_keeps_newest_whole_turns_within_the_budget(tiny_lm_dir):
    from vitaserve.lmtext.prompt import PromptBuilder, PromptTooLong, Turn
    from vitaserve.lmtext.text_tokenizer import load_text_tokenizer

    pb = PromptBuilder(load_text_tokenizer(tiny_lm_dir))
    history = [Turn([i] * 20, [100 + i] * 30) for i in range(10)]
    full = pb.spoken_qa([7] * 25, history)
    for budget in (len(full), len(full) - 1, 300, 150):
        ids = pb.spoken_qa([7] * 25, history, max_tokens=budget)
        assert len(ids) <= budget
        kept = next(k for k in range(11) if ids == pb.spoken_qa([7] * 25, history[k:]))
        if kept > 0:  # one more (older) turn would not have fit
            assert len(pb.spoken_qa([7] * 25, history[kept - 1:])) > budget
    assert pb.spoken_qa([7] * 25, history, max_tokens=len(full)) == full
    with pytest.raises(PromptTooLong):
        pb.spoken_qa([7] * 25, history, max_tokens=20)


# ---- item 1: a failed answer reaches the call as the failure itself, not an ExceptionGroup ---------
def test_speak_failure_is_unwrapped():
    from vitaserve.gateway.answer import first_leaf

    inner = ValueError("decoder down")
    assert first_leaf(ExceptionGroup("g", [ExceptionGroup("h", [inner])])) is inner
    assert first_leaf(inner) is inner


def test_generator_error_codes_are_values():
    import grpc

    from vitaserve.gateway.generator_client import GeneratorError
    from vitaserve.generator import contract

    for code in contract.CODES:
        err = GeneratorError.from_text(contract.error_text(code, "why"))
        assert err.code == grpc.StatusCode[code] and str(err) == "why"
    # untagged text is Triton's own: INTERNAL, unless it says the model is not there right now
    assert GeneratorError.from_text("Stub process is unhealthy and it will be restarted").code == grpc.StatusCode.INTERNAL
    assert GeneratorError.from_text("Request for unknown model").code == grpc.StatusCode.UNAVAILABLE
    assert GeneratorError.from_text("model 'vita_generator' is not ready").code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ValueError):
        contract.error_text("NOPE", "x")


# ---- item 9: internal details stay inside --------------------------------------------------------
def test_internal_failures_reach_the_caller_as_a_short_message_and_an_error_id(capsys):
    import grpc

    from vitaserve.common.session_types import StaleWriteError, StoreUnavailable
    from vitaserve.gateway.convert import call_status, turn_status
    from vitaserve.gateway.generator_client import GeneratorError

    backend = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   details="ipv4:10.1.2.3:50053: Failed to connect to remote host")
    secrets = ["10.1.2.3", "redis://:hunter2@", "gw-7:abcd", "Traceback", "KeyError"]
    failures = [backend, StoreUnavailable("Redis unavailable: redis://:hunter2@10.1.2.3"),
                StaleWriteError("the call is now owned by 'gw-7:abcd'", what="owner", value="gw-7:abcd"),
                GeneratorError("KeyError in engine step at 10.1.2.3", grpc.StatusCode.INTERNAL),
                KeyError("Traceback ... 10.1.2.3")]
    for exc in failures:
        for status in (turn_status, call_status):
            code, message = status(exc)
            assert code != grpc.StatusCode.UNKNOWN and "error id" in message, (exc, message)
            assert not any(s in message for s in secrets), message
    code, message = turn_status(GeneratorError("temperature must be a finite number", grpc.StatusCode.INVALID_ARGUMENT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in message  # the caller's own fault: said


def test_a_backend_replica_stopping_under_a_turn_is_unavailable_and_retried_not_cancelled():
    """A decoder draining mid-answer cancels its RPCs: the caller did not cancel anything, so the
    gateway retries it on another replica and, if none serves it, reports UNAVAILABLE."""
    import grpc

    from vitaserve.gateway.backends import _retryable
    from vitaserve.gateway.convert import turn_status
    from vitaserve.gateway.generator_client import GeneratorError

    cancelled = grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                     details="Cancelled on the server side")
    assert _retryable(cancelled)
    assert turn_status(cancelled)[0] == grpc.StatusCode.UNAVAILABLE
    deadline = grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata())
    assert not _retryable(deadline) and turn_status(deadline)[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    code, message = turn_status(GeneratorError("engine full: 4 waiting", grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "capacity" in message and "4 waiting" not in message


def test_the_triton_client_reconnects_as_fast_as_the_other_backends():
    """With tritonclient's default channel a restarted Triton stayed unreachable for minutes (gRPC's
    reconnect backoff grows to 120 s): the generator's channel has the gateway's backoff, and keeps
    tritonclient's keepalive and message-size options that channel_args would otherwise drop."""
    from vitaserve.common.channel_options import RECONNECT_BACKOFF
    from vitaserve.gateway.generator_client import KEEPALIVE, triton_channel_args

    args = dict(triton_channel_args())
    assert all(args[k] == v for k, v in RECONNECT_BACKOFF) and args["grpc.max_reconnect_backoff_ms"] <= 1000
    assert args["grpc.keepalive_time_ms"] == KEEPALIVE.keepalive_time_ms
    assert args["grpc.max_receive_message_length"] >= 1 << 20


def test_a_decoder_whose_redis_is_down_is_not_retried_on_another_replica():
    """Decoder replicas share one Redis and each retries it already: the gateway does not multiply
    that wait by its own attempts (Redis killed mid-answer: the caller's status came after 2.3-2.6 s)."""
    import grpc

    from vitaserve.common.retry_hint import NO_RETRY
    from vitaserve.gateway.backends import _retryable

    def unavailable(*trailing):
        return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing),
                                    details="session store unavailable")

    assert _retryable(unavailable()) and not _retryable(unavailable(NO_RETRY))
