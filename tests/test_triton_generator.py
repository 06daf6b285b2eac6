"""The generator as a real Triton model: streamed tokens, batching, cancellation, errors."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from importlib.resources import files

import grpc
import numpy as np
import pytest

from vitaserve.gateway.generator_client import GeneratorClient, GeneratorError
from vitaserve.generator import contract
from vitaserve.generator.contract import GeneratedToken, GenerationOptions
from vitaserve.generator.generate import generate
from vitaserve.lmtext.sampling_params import SamplingParams


GREEDY = GenerationOptions(mode="boost", max_new_tokens=40, greedy=True)


def offline(tiny_lm, prompt, mode, n):
    params = SamplingParams.from_defaults(tiny_lm.defaults, do_sample=False)
    return [e.token_id for e in generate(tiny_lm, prompt, mode, params, max_new_tokens=n)]


async def collect(client, prompt, opts):
    return [t async for t in client.generate(prompt, opts)]


def metric(triton, name):
    text = urllib.request.urlopen(triton["metrics"], timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_config_pbtxt_documents_the_contract_tensors():
    text = (files("vitaserve") / "model_repo" / contract.MODEL_NAME / "config.pbtxt").read_text()

    def declared(section):
        body = re.search(section + r" \[(.*?)\n\]", text, re.S).group(1)
        return {m[0]: (m[1], bool(m[2])) for m in
                re.findall(r'\{ name: "(\w+)" data_type: TYPE_(\w+) dims: \[ -?1 \](?: (optional: true))? \}', body)}

    def spec(s, optional):
        return s.name, ("STRING" if s.triton_dtype == "BYTES" else s.triton_dtype, optional)

    assert declared("input") == dict(spec(s, s is not contract.PROMPT_IDS) for s in contract.INPUTS)
    assert declared("output") == dict(spec(s, False) for s in contract.OUTPUTS)


def test_contract_round_trips_options_and_tokens():
    full = GenerationOptions(mode="turbo", max_new_tokens=7, greedy=True, temperature=0.5, top_k=3, top_p=0.9,
                             repetition_penalty=1.1, seed=2**40)
    for opts in (full, GenerationOptions()):
        arrays = contract.request_arrays([1, 2, 3], opts)
        assert all(a.dtype == contract.SPECS[name].numpy_dtype for name, a in arrays.items())
        prompt, back = contract.parse_request(arrays.get)
        assert prompt == [1, 2, 3] and back.mode == opts.mode and back.max_new_tokens == opts.max_new_tokens
        assert back.seed == opts.seed and back.top_k == opts.top_k and back.greedy == opts.greedy
        assert back.temperature == pytest.approx(opts.temperature) if opts.temperature else back.temperature is None
    assert set(contract.request_arrays([1], GenerationOptions())) == {"PROMPT_IDS", "MAX_NEW_TOKENS"}
    token = GeneratedToken(index=4, token_id=151700, is_audio=True, kind="m", finished=False)
    arrays = contract.token_arrays(token)
    assert all(a.dtype == contract.SPECS[name].numpy_dtype and a.shape == (1,) for name, a in arrays.items())
    assert contract.parse_token(arrays.__getitem__) == token
    with pytest.raises(ValueError, match="PROMPT_IDS"):
        contract.parse_request({"MODE": np.array([b"boost"], dtype=np.object_)}.get)


def test_streamed_tokens_equal_offline_generation(triton, tiny_lm):
    prompt = [11, 22, 33, 44, 55]

    async def main():
        client = GeneratorClient(triton["grpc"])
        try:
            return await collect(client, prompt, GREEDY)
        finally:
            await client.close()

    tokens = asyncio.run(main())
    assert [t.token_id for t in tokens] == offline(tiny_lm, prompt, "boost", 40)
    assert "".join(t.kind for t in tokens[:12]) == "M" + "m" * 10 + "M"
    assert tokens[-1].finished and not any(t.finished for t in tokens[:-1])
    assert [t.is_audio for t in tokens] == [tiny_lm.vocab.is_audio(t.token_id) for t in tokens]


def test_concurrent_requests_each_get_their_own_tokens(triton, tiny_lm):
    prompts = [[1, 2, 3], [7] * 20, [100, 200, 300, 400, 500, 600]]
    modes = ["boost", "turbo", "vanilla"]

    async def main():
        client = GeneratorClient(triton["grpc"])
        try:
            return await asyncio.gather(*[
                collect(client, p, GenerationOptions(mode=m, max_new_tokens=30, greedy=True))
                for p, m in zip(prompts, modes)])
        finally:
            await client.close()

    results = asyncio.run(main())
    for prompt, mode, tokens in zip(prompts, modes, results):
        assert [t.token_id for t in tokens] == offline(tiny_lm, prompt, mode, 30)


def test_bad_mode_and_bad_prompt_are_rejected_clearly(triton):
    async def main():
        client = GeneratorClient(triton["grpc"])
        errors = []
        try:
            for prompt, opts in [([1, 2], GenerationOptions(mode="1,11")), ([10**9], GenerationOptions(mode="boost"))]:
                with pytest.raises(GeneratorError) as err:
                    await collect(client, prompt, opts)
                errors.append(err.value)
            # the server is still healthy afterwards
            assert len(await collect(client, [1, 2, 3], GenerationOptions(max_new_tokens=3, greedy=True))) == 3
        finally:
            await client.close()
        return errors

    mode_err, prompt_err = asyncio.run(main())
    assert "MCTP modules" in str(mode_err) and mode_err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside" in str(prompt_err) and prompt_err.code == grpc.StatusCode.INVALID_ARGUMENT


def test_cancel_stops_generation_in_the_engine(triton):
    tokens_before = metric(triton, "vita_generator_tokens_total") or 0.0

    async def main():
        client = GeneratorClient(triton["grpc"])
        try:
            got = 0
            async for _ in client.generate([5, 6, 7], GenerationOptions(mode="boost", max_new_tokens=900, greedy=True,
                                                                        repetition_penalty=1.0)):
                got += 1
                if got == 5:
                    break  # barge-in: the async generator closes and cancels the call
            for _ in range(100):  # the engine notices within a step; wait on the gauge, bounded
                if metric(triton, "vita_generator_requests_in_flight") == 0:
                    break
                await asyncio.sleep(0.05)
            return got
        finally:
            await client.close()

    assert asyncio.run(main()) == 5
    assert metric(triton, "vita_generator_requests_in_flight") == 0
    # the engine stopped soon after the cancel: far fewer than the 900 tokens asked for
    assert metric(triton, "vita_generator_tokens_total") - tokens_before < 300


def test_tritonserver_stops_without_waiting_its_exit_timeout_after_many_calls(tmp_path, tiny_lm_dir):
    """12 concurrent answers on 8 slots, a third of them cancelled mid-way (barge-in), then SIGTERM.
    A request whose state Triton never released keeps the model 'live' and tritonserver waits its
    whole exit timeout (30 s); the client lets finished streams close by themselves so none leaks."""
    import time

    from servers import triton_server

    async def calls(url):
        client = GeneratorClient(url)

        async def one(i):
            n = 0
            async for _ in client.generate(list(range(100, 140)), GenerationOptions(max_new_tokens=80)):
                n += 1
                if i % 3 == 2 and n == 20:
                    break
            return n

        try:
            return await asyncio.gather(*[one(i) for i in range(12)])
        finally:
            await client.close()

    server = triton_server(tmp_path, tiny_lm_dir, num_slots=8)
    info = server.__enter__()
    try:
        counts = asyncio.run(calls(info["grpc"]))
    finally:
        start = time.perf_counter()
        server.__exit__(None, None, None)
        stop_s = time.perf_counter() - start
    assert counts.count(20) == 4 and len(counts) == 12
    log = info["log"].read_text()
    assert stop_s < 15 and "Timeout 20:" not in log, f"tritonserver took {stop_s:.1f} s to stop:\n{log[-1500:]}"
