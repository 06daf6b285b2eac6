"""Triton python-backend adapter over vitaserve's generation engine (decoupled mode).

Thin on purpose: parse tensors, submit to the engine thread, send one response per token, end every
request with the FINAL flag, honour cancellation. The model and its batching live in vitaserve.
"""

import json
import site
import threading
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _optional(request, name, cast):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = tensor.as_numpy().reshape(-1)[0]
    return cast(value.decode() if isinstance(value, bytes) else value)


class _Call:
    """One request's Triton objects, dropped the moment it ends: Triton waits (its exit timeout) for
    every request and response sender to be released before it unloads the model."""

    def __init__(self, request, sender):
        self.request, self.sender = request, sender
        self.final_sent = False  # the last token went out with the FINAL flag

    def is_cancelled(self):
        return self.request is not None and self.request.is_cancelled()

    def release(self):
        self.request = self.sender = None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("vita_generator must run in decoupled mode")
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if params.get("site_packages"):
            site.addsitedir(params["site_packages"])  # processes its .pth files (editable installs)
        if not params.get("lm_dir"):
            raise pb_utils.TritonModelException("parameter lm_dir (the VITA-Audio checkpoint folder) is empty")
        from vitaserve.generator import contract
        from vitaserve.generator.engine import Request
        from vitaserve.generator.engine_service import EngineService, RequestCancelled
        from vitaserve.generator.generate import LanguageModel
        from vitaserve.lmtext.sampling_params import SamplingParams

        from vitaserve.common.threads import set_torch_threads

        set_torch_threads(int(params.get("threads") or 0))  # 0: the CPUs this container may use
        device = params.get("device") or "cpu"
        dtype = params.get("dtype") or ("float32" if device == "cpu" else "bfloat16")
        self.lm = LanguageModel.from_folder(params["lm_dir"], device=device, dtype=dtype,
                                            max_len=int(params.get("max_len") or 4096),
                                            num_slots=int(params.get("num_slots") or 16))
        self.Request, self.SamplingParams, self.Cancelled = Request, SamplingParams, RequestCancelled
        self.contract = contract
        self.service = EngineService(self.lm)
        # Requests in flight in this instance's engine: what the autoscaler and tests read.
        self.in_flight = 0
        self.lock = threading.Lock()
        # the families must outlive their metrics: keep them on self
        self.in_flight_family = family = pb_utils.MetricFamily(name="vita_generator_requests_in_flight",
                                       description="generation requests running or queued in the engine",
                                       kind=pb_utils.MetricFamily.GAUGE)
        self.in_flight_metric = family.Metric(labels={"model": "vita_generator"})
        self.tokens_family = tokens = pb_utils.MetricFamily(name="vita_generator_tokens_total", description="tokens generated",
                                       kind=pb_utils.MetricFamily.COUNTER)
        self.tokens_metric = tokens.Metric(labels={"model": "vita_generator"})

    def _count(self, delta):
        with self.lock:
            self.in_flight += delta
            self.in_flight_metric.set(self.in_flight)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                gen_request = self._parse(request)
            except (ValueError, TypeError, AttributeError) as exc:  # a missing or ill-typed tensor too
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    self.contract.error_text(self.contract.INVALID_ARGUMENT, f"invalid request: {exc}"))), flags=FINAL)
                continue
            self._count(+1)
            call = _Call(request, sender)
            self.service.submit(gen_request, self._on_token(call), self._on_done(call), is_cancelled=call.is_cancelled)
        return None

    def _parse(self, request):
        prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT_IDS").as_numpy().reshape(-1).tolist()
        greedy = _optional(request, "GREEDY", bool)
        sampling = self.SamplingParams.from_defaults(
            self.lm.defaults, do_sample=False if greedy else None,
            temperature=_optional(request, "TEMPERATURE", float), top_k=_optional(request, "TOP_K", int),
            top_p=_optional(request, "TOP_P", float),
            repetition_penalty=_optional(request, "REPETITION_PENALTY", float), seed=_optional(request, "SEED", int),
        )
        mode = _optional(request, "MODE", str) or None
        self.lm.schedule(mode)  # validates early, with a message the client can read
        return self.Request(
            request_id=request.request_id() or uuid.uuid4().hex, prompt_ids=[int(t) for t in prompt], mode=mode,
            sampling=sampling, max_new_tokens=_optional(request, "MAX_NEW_TOKENS", int) or 1024,
        )

    def _on_token(self, call):
        def send(event):
            self.tokens_metric.increment(1)
            outputs = [
                pb_utils.Tensor("TOKEN_ID", np.array([event.token_id], dtype=np.int64)),
                pb_utils.Tensor("IS_AUDIO", np.array([event.is_audio], dtype=np.bool_)),
                pb_utils.Tensor("STEP_KIND", np.array([event.kind.encode()], dtype=np.object_)),
                pb_utils.Tensor("INDEX", np.array([event.index], dtype=np.int32)),
                pb_utils.Tensor("FINISHED", np.array([event.finished], dtype=np.bool_)),
            ]
            # The last token carries FINAL itself: a client that stops reading at the finished token
            # (and cancels its stream) must not race a separate FINAL message, or Triton never sees
            # the request complete and waits its whole exit timeout at shutdown.
            call.sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if event.finished else 0)
            call.final_sent = event.finished

        return send

    def _on_done(self, call):
        def done(error):
            self._count(-1)
            sender, final_sent = call.sender, call.final_sent
            call.release()
            if final_sent:
                return
            if error is None:
                sender.send(flags=FINAL)
            elif isinstance(error, self.Cancelled):
                sender.send(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("cancelled", pb_utils.TritonError.CANCELLED)), flags=FINAL)
            else:
                # ValueError: the engine refused the request (prompt too long for the context, ...)
                code = self.contract.INVALID_ARGUMENT if isinstance(error, ValueError) else self.contract.INTERNAL
                sender.send(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(self.contract.error_text(code, str(error)))), flags=FINAL)

        return done

    def finalize(self):
        self.service.stop()
