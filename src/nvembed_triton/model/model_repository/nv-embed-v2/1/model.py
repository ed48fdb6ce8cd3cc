"""The model: the client contract (`query` BYTES [1] or `documents` BYTES [1, N] -> `embeddings` FP32
[1 or N, D], L2-normalised; on request `token_counts` INT32 and `truncated` BOOL [N]), computed here.
Per-request options are request parameters (instruction, prompt_name, truncate).

execute() reads and checks each request once and hands it to a lane (lanes.py); the lanes compute the
requests they hold together and answer each through its response sender, so a short request is never
held behind a long one. A request whose own timeout passes is answered then; one whose client left
is answered before its next forward pass; either way its texts are left out of the passes still to run."""

# The Python backend imports asyncio when execute() returns (to ask whether it returned a coroutine):
# ~20 ms on the first request, then never again. Imported here, it is paid at load.
import asyncio  # noqa: F401
import collections
import hmac
import json
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

# Before torch loads: idle OpenMP threads sleep instead of spinning. On a CPU host spinning takes
# cores from tritonserver and the request threads: PASSIVE gave the most queries/s at 1, 16 and 64
# clients (bench/RESULTS.md). On a GPU host the CPU threads mostly wait for the GPU, so the same
# holds. An OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from nvembed_triton.engine.checkpoint import check_served_name  # noqa: E402
from nvembed_triton.engine.encoders import load_encoder  # noqa: E402
from nvembed_triton.model.deadlines import Deadlines  # noqa: E402
from nvembed_triton.model.held import Held  # noqa: E402
from nvembed_triton.model.lanes import LaneLimits, Lanes  # noqa: E402
from nvembed_triton.model.metrics import ModelMetrics  # noqa: E402
from nvembed_triton.model.pass_log import PassLog  # noqa: E402
from nvembed_triton.model.request_rules import Refusal, combine, configured_instructions, read_request, split  # noqa: E402
from nvembed_triton.model.threads import cache_this_thread  # noqa: E402
from nvembed_triton.protocol import contract  # noqa: E402
from nvembed_triton.protocol.errors import InvalidInputError  # noqa: E402
from nvembed_triton.protocol.lifecycle import CANCELLED_MESSAGE, CLOSED_MESSAGE, TIMEOUT_MESSAGE, is_closed  # noqa: E402
from nvembed_triton.protocol.reasons import REASONS, UNAUTHORIZED_MESSAGE  # noqa: E402
from nvembed_triton.protocol.validation import RequestLimits  # noqa: E402
from nvembed_triton.settings import EncoderSettings, launcher_setting, model_settings, triton_parameters  # noqa: E402

# How stale a request's "is its client still there" answer may be before a pass: each ask is an IPC
# call, so a request answered within one short pass, as most are, is never asked.
CANCEL_CHECK_INTERVAL_S = 0.05
# Only a request with at least this many characters of text in the coming pass is asked: for a few
# short queries the asks, one IPC call each, cost more than computing them (bench/RESULTS.md).
WORTH_ASKING_CHARS = 2048
# A request with more UTF-8 bytes of text than this many per token of the pass budget goes to the
# long lane: about one full forward pass of text (English averages ~4 bytes per token).
LONG_REQUEST_BYTES_PER_BATCH_TOKEN = 4
LANE_MAX_REQUESTS_OF_TEXT = 4  # bytes of text one lane holds: four of the largest requests
# Threads that send a pass's answers while its lane computes the next pass: each send waits for
# tritonserver (an IPC round trip, the GIL released), so sending them one by one on the lane left
# the device idle between passes (bench/RESULTS.md).
ANSWER_THREADS = 4
FINALIZE_WAIT_S = 30.0  # how long an unload waits for the batch being computed
UNLOADING_MESSAGE = "the model is being unloaded; retry"


class TritonPythonModel:
    def initialize(self, args):
        cache_this_thread()  # initialize() runs on the thread execute() runs on
        started = time.monotonic()
        values = model_settings(triton_parameters(json.loads(args["model_config"])))
        settings = EncoderSettings.from_settings(values, args["model_instance_kind"], args["model_instance_device_id"])
        self.encoder = load_encoder(settings)
        self.dtype = settings.dtype
        self.limits = RequestLimits.from_settings(values)
        check_served_name(args["model_name"], self.encoder.architecture)
        configured = {prompt: values[f"{prompt}_instruction"] for prompt in contract.PROMPT_NAMES}  # query_instruction, ...
        self.instruction_for = configured_instructions(configured, self.encoder.default_instruction)
        self.metrics = ModelMetrics(args["model_name"])
        # serve.sh's inference_key, from the environment: Triton forwards the header that carries it.
        self.inference_key = launcher_setting("inference_key").encode()
        # execute() never waits: a request that finds every place taken is refused at once (config.pbtxt).
        self.held_requests = held_requests = values["max_held_requests"]
        self.places = threading.BoundedSemaphore(held_requests)
        long_request_bytes = LONG_REQUEST_BYTES_PER_BATCH_TOKEN * settings.max_batch_tokens
        lane_bytes = LANE_MAX_REQUESTS_OF_TEXT * self.limits.max_request_bytes
        batch_bytes = max(long_request_bytes, self.limits.max_request_bytes)
        self.lanes = Lanes(
            self._run_batch, long_request_bytes, LaneLimits(held_requests, lane_bytes, batch_bytes), setup=cache_this_thread,
            long_limits=LaneLimits(max(1, held_requests // 2), lane_bytes, batch_bytes),  # half the places stay short's
        )  # fmt: skip
        self.answers = ThreadPoolExecutor(ANSWER_THREADS, thread_name_prefix="answer", initializer=cache_this_thread)
        self.deadlines = Deadlines(setup=cache_this_thread)
        self.pass_log = PassLog(values["pass_log"]) if values["pass_log"] else None
        pb_utils.Logger.log_info(
            f"{args['model_name']}: {self.encoder.architecture.value} from {settings.model_dir} on {settings.device} "
            f"({settings.dtype}, {self.encoder.runs_on}), dimension {self.encoder.dimension}, "
            f"max_length {self.encoder.max_length}, loaded in {time.monotonic() - started:.1f} s"
        )

    def execute(self, requests):
        for request in requests:
            self._accept(request)
        return None  # every response goes through its request's response sender

    def finalize(self):
        for held in self.lanes.close(FINALIZE_WAIT_S):
            self._refuse(held, "unavailable", UNLOADING_MESSAGE)
        self.answers.shutdown(wait=True)  # what the last passes computed is sent
        self.deadlines.close()
        self.metrics.close()
        if self.pass_log:
            self.pass_log.close()

    def _accept(self, request):
        now = time.monotonic()
        sender = request.get_response_sender()
        timeout_us = request.timeout()  # the request's own timeout (tritonclient's `timeout`), 0 if none
        held = Held(
            request.is_cancelled, lambda response: sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL),
            taken=now, deadline=now + timeout_us / 1e6 if timeout_us else None,
            wanted=frozenset(request.requested_output_names()), request=request,
        )  # fmt: skip
        self.metrics.hold(1)  # until answered: a drain waits for the gauge to come down
        if not self.places.acquire(blocking=False):
            self._refuse(held, "over_capacity", f"the model holds {self.held_requests} requests, its max_held_requests "
                                                 "(exceeds maximum queue size); retry")
            return
        held.placed = True
        try:
            self._take_on(held, request)
        except Exception as error:  # a request must get an answer whatever goes wrong
            self._log_error(f"taking a request on failed: {error!r}")
            self._refuse(held, "internal", f"taking the request on failed: {error}")

    def _take_on(self, held, request):
        """Reads the request and hands it to a lane, or refuses it."""
        if is_closed():  # a drain has served what was queued; this request came later
            self._refuse(held, "shutting_down", CLOSED_MESSAGE)
            return

        def tensor(name):
            found = pb_utils.get_input_tensor_by_name(request, name)
            return None if found is None else found.as_numpy()

        parameters = json.loads(request.parameters() or "{}")
        given = str(parameters.pop(contract.INFERENCE_KEY_HEADER, "")).encode()
        if self.inference_key and not hmac.compare_digest(given, self.inference_key):
            self._refuse(held, "unauthorized", f"{UNAUTHORIZED_MESSAGE}; send the server's inference key in it")
            return
        try:
            held.job = read_request(
                tensor(contract.QUERY_INPUT), tensor(contract.DOCUMENTS_INPUT), parameters, self.limits,
                self.instruction_for, self.encoder.check_instruction,
            )  # fmt: skip
        except InvalidInputError as error:
            self._refuse(held, "invalid_input", str(error))
            return
        if not self.lanes.submit(held, held.job.size):
            lane = self.lanes.lane_for(held.job.size).name
            self._refuse(held, "over_capacity", f"the model's {lane} lane is full (exceeds maximum queue size); retry")
        elif held.deadline is not None:
            # Weakly: a request answered long before its deadline is not kept alive until then.
            reference = weakref.ref(held)
            self.deadlines.at(held.deadline, lambda: self._end_if_waited_for(reference(), time.monotonic()))

    def _end_if_waited_for(self, held, now, ask=True):
        """Answers a request nobody waits for any more: its timeout passed, or its client left (if
        `ask`, asked at most every CANCEL_CHECK_INTERVAL_S). Does nothing to one already answered."""
        if held is None or held.answered:
            return
        if held.timed_out(now):
            self._refuse(held, "cancelled", TIMEOUT_MESSAGE)
        elif ask and now - held.checked >= CANCEL_CHECK_INTERVAL_S and held.client_left(now):
            self._refuse(held, "cancelled", CANCELLED_MESSAGE)

    def _run_batch(self, batch, lane):
        """On a lane's thread: compute the held requests together and answer each."""
        batch = [held for held in batch if not held.answered]  # timed out while waiting
        if not batch:
            return
        try:
            pairs = list(zip(batch, self._encode_together(batch, lane), strict=True))
            if len(pairs) == 1:  # a lone request: handing it to a thread would only add a wake-up to its latency
                self._deliver(pairs)
                return
            for start in range(ANSWER_THREADS):  # one task per thread: a task per answer cost more than it saved
                if share := pairs[start::ANSWER_THREADS]:
                    self.answers.submit(self._deliver, share)
        except Exception as error:  # a lane must outlive any fault; its requests still get an answer
            self._log_error(f"answering {len(batch)} request(s) failed: {error!r}")
            for held in batch:
                self._refuse(held, "internal", f"answering failed: {error}")

    def _encode_together(self, batch, lane):
        """One encode call over every text of every request (request_rules.combine), so the
        token-budget planner packs across requests; its rows are then split back, in order."""
        jobs = [held.job for held in batch]
        call = combine(jobs)

        def keep(indices):
            """Before each forward pass: the texts of requests somebody still waits for."""
            now = time.monotonic()
            chars = collections.Counter()
            for i in indices:
                chars[call.owners[i]] += len(call.texts[i])
            for position, count in chars.items():
                self._end_if_waited_for(batch[position], now, ask=count >= WORTH_ASKING_CHARS)
            return [i for i in indices if not batch[call.owners[i]].answered]

        try:
            result = self.encoder.encode(call.texts, call.options, keep)
        except InvalidInputError as error:
            return [Refusal("invalid_input", str(error))] * len(jobs)
        except Exception as error:  # e.g. out of memory: these requests fail, the model stays up
            self._log_error(f"encode failed for {len(jobs)} request(s): {error!r}")
            return [Refusal("internal", f"encoding failed: {error}")] * len(jobs)
        self.metrics.add("nvembed_forward_passes_total", result.passes)
        self.metrics.add("nvembed_padded_tokens_total", result.padded_tokens)
        if self.pass_log:
            self.pass_log.write(lane.name, len(batch), lane.waiting(), result.records)
        return split(result.embeddings, result.token_counts, result.truncated, jobs, self.encoder.max_length, self.dtype)

    def _deliver(self, pairs):
        """On an answer thread: each request's answer or refusal."""
        for held, outcome in pairs:
            if isinstance(outcome, Refusal):
                self._refuse(held, outcome.reason, outcome.message)
            else:
                self._answer(held, lambda outcome=outcome, held=held: self._response(outcome, held))

    def _response(self, answer, held):
        """The response, with the outputs its request asked for, and the metrics of the texts it carries."""
        self.metrics.add("nvembed_texts_total", len(held.job.texts), prompt=held.job.prompt)
        self.metrics.add("nvembed_tokens_total", int(answer.token_counts.sum()), prompt=held.job.prompt)
        self.metrics.add("nvembed_truncated_texts_total", int(answer.truncated.sum()))
        outputs = {
            contract.EMBEDDINGS_OUTPUT: np.ascontiguousarray(answer.embeddings),
            contract.TOKEN_COUNTS_OUTPUT: answer.token_counts,
            contract.TRUNCATED_OUTPUT: answer.truncated.astype(bool),
        }
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, outputs[name]) for name in outputs if name in held.wanted])

    def _refuse(self, held, reason, message):
        self._answer(held, lambda: _error_response(reason, message), reason)

    def _answer(self, held, response, rejected_reason=None):
        """Sends the request's final response, `response()`, unless it has one; frees its place."""
        if not held.claim():
            return
        try:
            try:
                made = response()
            except Exception as error:  # the request still gets an answer
                made, rejected_reason = _error_response("internal", f"answering failed: {error!r}"), "internal"
            held.send_final(made)
        except Exception as error:  # nothing more can be sent for this request: say so in the log
            self._log_error(f"sending a response failed: {error!r}")
        finally:
            if rejected_reason:
                self.metrics.rejected(rejected_reason)
            self.metrics.release(1)
            if held.placed:
                self.places.release()

    def _log_error(self, message):
        with self.metrics.ipc_lock:  # a log line is an IPC call too
            pb_utils.Logger.log_error(message)


def _error_response(reason, message):
    """An error response with the Triton code of its reason (reasons.REASONS)."""
    code = getattr(pb_utils.TritonError, REASONS[reason].triton_code)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
