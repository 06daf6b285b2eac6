"""The engine thread hands responses to a sender thread: a caller whose response sender blocks does
not hold up generation, and every caller still gets its tokens in order and on_done once."""

from __future__ import annotations

import threading
import time

from vitaserve.generator.engine import Request
from vitaserve.generator.engine_service import EngineService
from vitaserve.generator.generate import generate

from test_lm_model import GREEDY, random_prompt


def _alone(lm, prompt, n):
    return [e.token_id for e in generate(lm, prompt, "turbo", GREEDY, max_new_tokens=n, stop_ids=())]


def test_a_blocked_response_sender_does_not_stop_generation(tiny_lm):
    prompts = {"slow": random_prompt(tiny_lm, 7, seed=1), "fast": random_prompt(tiny_lm, 9, seed=2)}
    release = threading.Event()
    tokens = {rid: [] for rid in prompts}
    done = {rid: [] for rid in prompts}
    finished = threading.Event()

    def on_token(rid):
        def f(event):
            if rid == "slow":
                release.wait(30)  # Triton's sender stuck on a slow client
            tokens[rid].append(event.token_id)
        return f

    def on_done(rid):
        def f(error):
            done[rid].append(error)
            if all(done.values()):
                finished.set()
        return f

    service = EngineService(tiny_lm, name="test-sender")
    try:
        for rid, p in prompts.items():
            service.submit(Request(rid, p, "turbo", GREEDY, 20, stop_ids=()), on_token(rid), on_done(rid))
        deadline = time.monotonic() + 30  # generous: 20 tiny steps take well under a second
        while (service.load()["running"] or service.load()["waiting"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        # both calls finished generating while the first on_token of "slow" was still blocked
        assert service.load()["running"] == 0 and not release.is_set()
        assert tokens["slow"] == []
        release.set()
        assert finished.wait(30)
        assert tokens == {rid: _alone(tiny_lm, p, 20) for rid, p in prompts.items()}
        assert done == {"slow": [None], "fast": [None]}
    finally:
        release.set()
        service.stop()


def test_a_failing_on_token_ends_that_call_alone_with_one_on_done(tiny_lm):
    prompt = random_prompt(tiny_lm, 8, seed=3)
    got, done = {"bad": [], "good": []}, {"bad": [], "good": []}
    ended = threading.Event()

    def on_token(rid):
        def f(event):
            if rid == "bad" and event.index == 2:
                raise RuntimeError("client gone")
            got[rid].append(event.token_id)
        return f

    def on_done(rid):
        def f(error):
            done[rid].append(error)
            if done["bad"] and done["good"]:
                ended.set()
        return f

    service = EngineService(tiny_lm, name="test-sender-fail")
    try:
        for rid in got:
            service.submit(Request(rid, prompt, "turbo", GREEDY, 20, stop_ids=()), on_token(rid), on_done(rid))
        assert ended.wait(60)
        time.sleep(0.2)  # a second on_done would come from the engine's cancel at its next step
        assert [type(e).__name__ for e in done["bad"]] == ["RuntimeError"]
        assert got["bad"] == _alone(tiny_lm, prompt, 20)[:2]
        assert done["good"] == [None] and got["good"] == _alone(tiny_lm, prompt, 20)
        assert service.load()["running"] == 0
    finally:
        service.stop()
