"""Triton python-backend adapter over vitaserve's generation engine (decoupled mode).

Thin on purpose: parse tensors, submit to the engine thread, send one response per token, end every
request with the FINAL flag, honour cancellation. The model and its batching live in vitaserve.
"""

import json
import site
import threading
import uuid

import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _numpy(request, name):
    """The named input as a numpy array, None when the request does not carry it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class _Call:
    """One request's Triton objects, dropped the moment it ends: Triton waits (its exit timeout) for
    every request and response sender to be released before it unloads the model."""

    def __init__(self, request, sender, log):
        self.request, self.sender = request, sender
        self.log = log  # bound to the request's trace (turn, hashed session)
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
        from vitaserve.generator.engine import EngineFull, Request
        from vitaserve.generator.engine_service import EngineService, RequestCancelled
        from vitaserve.generator.language_model import LanguageModel
        from vitaserve.generator.scheduler import SchedulerConfig
        from vitaserve.lmtext.sampling_params import SamplingParams

        from vitaserve.common.logs import configure_logging
        from vitaserve.common.threads import set_torch_threads

        configure_logging("generator")  # JSON lines on the stub's stdout: Triton's log
        import structlog

        self.log = structlog.get_logger("vita_generator").bind(service="generator")  # any thread
        set_torch_threads(int(params.get("threads") or 0))  # 0: the CPUs this container may use
        device = params.get("device") or "cpu"
        dtype = params.get("dtype") or ("float32" if device == "cpu" else "bfloat16")
        try:  # a bad setting fails before the weights load (minutes at 7B)
            scheduler = SchedulerConfig.from_strings(params)
        except ValueError as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        self.lm = LanguageModel.from_folder(params["lm_dir"], device=device, dtype=dtype,
                                            max_len=int(params.get("max_len") or 4096),
                                            num_slots=int(params.get("num_slots") or 16))
        self.Request, self.SamplingParams, self.Cancelled = Request, SamplingParams, RequestCancelled
        self.EngineFull = EngineFull
        self.contract = contract
        # requests that may wait for a slot beyond the running ones; more get RESOURCE_EXHAUSTED at once
        self.service = EngineService(self.lm, max_waiting=int(params.get("max_waiting") or 0), scheduler=scheduler)
        # Requests in flight in this instance's engine: what the autoscaler and tests read.
        self.in_flight = 0
        self.lock = threading.Lock()
        # the families must outlive their metrics: keep them on self
        self.in_flight_family = family = pb_utils.MetricFamily(name="vita_generator_requests_in_flight",
                                       description="generation requests running or queued in the engine",
                                       kind=pb_utils.MetricFamily.GAUGE)
        self.in_flight_metric = family.Metric(labels={"model": contract.MODEL_NAME})
        self.queue_family = queue = pb_utils.MetricFamily(
            name="vita_generator_queue_depth", description="generation requests waiting for a slot of the engine",
            kind=pb_utils.MetricFamily.GAUGE)
        self.queue_metric = queue.Metric(labels={"model": contract.MODEL_NAME})
        self.tokens_family = tokens = pb_utils.MetricFamily(name="vita_generator_tokens_total", description="tokens generated",
                                       kind=pb_utils.MetricFamily.COUNTER)
        self.tokens_metric = tokens.Metric(labels={"model": contract.MODEL_NAME})

    def _count(self, delta):
        with self.lock:
            self.in_flight += delta
            self.in_flight_metric.set(self.in_flight)
        self._queue_depth()

    def _queue_depth(self):
        """Read at each submit, end and first token (when a waiting request got its slot)."""
        self.queue_metric.set(self.service.load()["waiting"])

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                gen_request = self._parse(request)
            except (ValueError, TypeError, AttributeError) as exc:  # a missing or ill-typed tensor too
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    self.contract.error_text(self.contract.INVALID_ARGUMENT, f"invalid request: {exc}"))), flags=FINAL)
                continue
            trace = self._trace(request)
            call = _Call(request, sender, self.log.bind(request_id=gen_request.request_id, **trace.fields()))
            call.log.info("generation started", prompt_tokens=len(gen_request.prompt_ids),
                          max_new_tokens=gen_request.max_new_tokens, mode=gen_request.mode)
            self._count(+1)
            try:
                self.service.submit(gen_request, self._on_token(call), self._on_done(call),
                                    is_cancelled=call.is_cancelled)
            except self.EngineFull as exc:  # the waiting queue is full: refused at once, never queued
                self._on_done(call)(exc)
        return None

    def _trace(self, request):
        try:
            parameters = request.parameters()
        except AttributeError:  # a python backend without request parameters (before 23.04)
            parameters = "{}"
        return self.contract.request_trace(parameters)

    def _parse(self, request):
        prompt, options = self.contract.parse_request(lambda name: _numpy(request, name))
        sampling = self.SamplingParams.from_defaults(self.lm.defaults, **options.sampling_overrides())
        self.lm.schedule(options.mode)  # validates early, with a message the client can read
        return self.Request(request_id=request.request_id() or uuid.uuid4().hex, prompt_ids=prompt,
                            mode=options.mode, sampling=sampling, max_new_tokens=options.max_new_tokens)

    def _on_token(self, call):
        def send(event):
            self.tokens_metric.increment(1)
            outputs = [pb_utils.Tensor(name, array) for name, array in self.contract.token_arrays(event).items()]
            # The last token carries FINAL itself: a client that stops reading at the finished token
            # (and cancels its stream) must not race a separate FINAL message, or Triton never sees
            # the request complete and waits its whole exit timeout at shutdown.
            call.sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if event.finished else 0)
            call.final_sent = event.finished
            if event.index == 0:
                self._queue_depth()

        return send

    def _on_done(self, call):
        def done(error):
            self._count(-1)
            sender, final_sent = call.sender, call.final_sent
            call.release()
            if error is None:
                call.log.info("generation finished")
            else:
                call.log.info("generation ended", error=type(error).__name__)
            if final_sent:
                return
            if error is None:
                sender.send(flags=FINAL)
            elif isinstance(error, self.Cancelled):
                sender.send(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("cancelled", pb_utils.TritonError.CANCELLED)), flags=FINAL)
            else:
                # ValueError: the engine refused the request (prompt too long for the context, ...)
                code = (self.contract.INVALID_ARGUMENT if isinstance(error, ValueError) else
                        self.contract.RESOURCE_EXHAUSTED if isinstance(error, self.EngineFull) else
                        self.contract.INTERNAL)
                sender.send(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(self.contract.error_text(code, str(error)))), flags=FINAL)

        return done

    def finalize(self):
        self.service.stop()
