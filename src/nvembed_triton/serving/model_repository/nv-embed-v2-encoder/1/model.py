"""The encoder model: holds the weights and computes. max_batch_size > 0 with dynamic batching, so
concurrent requests (from the public model, or from clients that send a batch dimension) arrive
together and share forward passes packed by token budget.
Inputs: `text` BYTES [B, N]; optional `prompt_name` ("query" | "document") and `instruction`
BYTES [B, 1]; request parameter `truncate` (END | START | NONE). Outputs: `embeddings` FP32
[B, N, D], L2-normalised; on request `token_counts` INT32 and `truncated` BOOL [B, N].

execute() only checks each request and hands it to a lane (lanes.py); the lanes compute and answer
through each request's response sender, so a short request is never held behind a long one."""

# The Python backend imports asyncio when execute() returns (to ask whether it returned a coroutine):
# ~20 ms on each instance's first request, then never again. Imported here, it is paid at load.
import asyncio  # noqa: F401
import json
import os
import time

# Before torch loads: idle OpenMP threads sleep instead of spinning. On a CPU host spinning takes
# cores from the front instances and the server: through the server, PASSIVE gave the most
# queries/s at 1, 16 and 64 clients (bench/RESULTS.md). On a GPU host the CPU threads mostly wait
# for the GPU, so the same holds.
# An OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from nvembed_triton.engine.checkpoint import check_served_name  # noqa: E402
from nvembed_triton.engine.encoders import load_encoder  # noqa: E402
from nvembed_triton.protocol import contract  # noqa: E402
from nvembed_triton.protocol.errors import InvalidInputError  # noqa: E402
from nvembed_triton.protocol.lifecycle import CancelBoard  # noqa: E402
from nvembed_triton.protocol.reasons import REASONS  # noqa: E402
from nvembed_triton.protocol.request_rules import Refusal, combine, encoder_request, split  # noqa: E402
from nvembed_triton.protocol.settings import ENCODER, EncoderSettings, model_settings, triton_parameters  # noqa: E402
from nvembed_triton.protocol.validation import RequestLimits  # noqa: E402
from nvembed_triton.serving.lanes import LaneLimits, Lanes  # noqa: E402
from nvembed_triton.serving.memory import cache_this_thread  # noqa: E402
from nvembed_triton.serving.metrics import ENCODER_COUNTERS, ModelMetrics  # noqa: E402

CANCEL_CHECK_INTERVAL_S = 0.05  # how stale a request's "is anyone still waiting" answer may be
# A request with more UTF-8 bytes of text than this many per token of the pass budget goes to the
# long lane: about one full forward pass of text (English averages ~4 bytes per token).
LONG_REQUEST_BYTES_PER_BATCH_TOKEN = 4
# What one lane holds before it refuses (over capacity): as many requests as Triton's queue held
# before the lanes (config.pbtxt max_queue_size 64) plus one batch, and four full requests of text.
LANE_MAX_REQUESTS = 128
LANE_MAX_REQUESTS_OF_TEXT = 4
FINALIZE_WAIT_S = 30.0  # how long an unload waits for the batch being computed


class TritonPythonModel:
    def initialize(self, args):
        cache_this_thread()  # initialize() runs on the thread execute() runs on
        started = time.monotonic()
        values = model_settings(ENCODER, triton_parameters(json.loads(args["model_config"])))
        settings = EncoderSettings.from_settings(values, args["model_instance_kind"], args["model_instance_device_id"])
        self.encoder = load_encoder(settings)
        self.dtype = settings.dtype
        self.limits = RequestLimits.from_settings(values)
        check_served_name(args["model_name"], self.encoder.architecture)
        self.cancel_board = CancelBoard()
        self.metrics = ModelMetrics(args["model_name"], ENCODER_COUNTERS)
        long_request_bytes = LONG_REQUEST_BYTES_PER_BATCH_TOKEN * settings.max_batch_tokens
        limits = LaneLimits(
            max_requests=LANE_MAX_REQUESTS,
            max_bytes=LANE_MAX_REQUESTS_OF_TEXT * self.limits.max_request_bytes,
            batch_bytes=max(long_request_bytes, self.limits.max_request_bytes),
        )
        self.lanes = Lanes(self._run_batch, long_request_bytes, limits, setup=cache_this_thread)
        pb_utils.Logger.log_info(
            f"{args['model_name']}: {self.encoder.architecture.value} from {settings.model_dir} on {settings.device} "
            f"({settings.dtype}, {self.encoder.runs_on}), dimension {self.encoder.dimension}, "
            f"max_length {self.encoder.max_length}, loaded in {time.monotonic() - started:.1f} s"
        )

    def execute(self, requests):
        for request in requests:
            self._accept(request)
        return None  # every response goes through the request's response sender

    def finalize(self):
        for held in self.lanes.close(FINALIZE_WAIT_S):
            self._send(held, self._refusal(Refusal("unavailable", "the model is being unloaded; retry")))
        self.metrics.close()

    def _accept(self, request):
        held = Held(request, request.get_response_sender(), set(request.requested_output_names()), time.monotonic())
        self.metrics.hold(1)
        try:
            held.job = self._read_request(request)
        except InvalidInputError as error:
            self._send(held, self._refusal(Refusal("invalid_input", str(error))))
            return
        size = sum(len(text.encode()) for row in held.job.rows for text in row)
        if not self.lanes.submit(held, size):
            lane = self.lanes.lane_for(size).name
            message = f"the encoder's {lane} lane is full (exceeds maximum queue size); retry"
            self._send(held, self._refusal(Refusal("over_capacity", message)))

    def _run_batch(self, batch):
        """On a lane's thread: compute the held requests together and answer each."""
        try:
            outcomes = self._encode_together([held.job for held in batch], [held.taken for held in batch])
            for held, outcome in zip(batch, outcomes, strict=True):
                self._send(held, self._refusal(outcome) if isinstance(outcome, Refusal) else self._respond(outcome, held))
        except Exception as error:  # a lane must outlive any fault; its requests still get an answer
            with self.metrics.ipc_lock:  # a log line is an IPC call too
                pb_utils.Logger.log_error(f"answering {len(batch)} request(s) failed: {error!r}")
            for held in batch:
                if not held.answered:
                    self._send(held, self._refusal(Refusal("internal", f"answering failed: {error}")))

    def _send(self, held, response):
        held.answered = True
        try:
            held.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            self.metrics.release(1)

    def _read_request(self, request):
        def tensor(name):
            found = pb_utils.get_input_tensor_by_name(request, name)
            return None if found is None else found.as_numpy()

        return encoder_request(
            tensor(contract.TEXT_INPUT),
            tensor(contract.PROMPT_NAME_INPUT),
            tensor(contract.INSTRUCTION_INPUT),
            request.parameters(),
            self.limits,
            self.encoder.default_instruction,
            self.encoder.check_instruction,
        )

    def _encode_together(self, jobs, taken):
        """One encode call over every text of every request (request_rules.combine), so the
        token-budget planner packs across requests; its rows are then split back, in order.
        `taken`: when each request was taken on (time.monotonic())."""
        call = combine(jobs)
        abandoned = set()  # positions in `jobs` whose client has gone
        checked = dict(enumerate(taken))  # position -> when last looked (or taken on)

        def keep(batch):
            """Before each forward pass: drop the texts of requests nobody waits for any more, as the
            public model marks them on the cancel board. Not request.is_cancelled(): on a request
            whose execute() has returned it crashed tritonserver 2.51 (SIGSEGV in
            TRITONBACKEND_ResponseFactoryIsCancelled, once in a 21-minute soak). Each request is
            looked at once it has been held CANCEL_CHECK_INTERVAL_S, then at most that often: one
            that waited in its lane is looked at before its first pass, and a request taken on at
            once and computed in one short pass, as most are, is never looked at."""
            now = time.monotonic()
            for position in {call.owners[i] for i in batch} - abandoned:
                if now - checked[position] < CANCEL_CHECK_INTERVAL_S:
                    continue
                checked[position] = now
                if self.cancel_board.is_marked(jobs[position].cancel_token):
                    abandoned.add(position)
            return [i for i in batch if call.owners[i] not in abandoned]

        try:
            result = self.encoder.encode(call.texts, call.options, keep)
        except InvalidInputError as error:
            return [Refusal("invalid_input", str(error))] * len(jobs)
        except Exception as error:  # e.g. out of memory: these requests fail, the model stays up
            with self.metrics.ipc_lock:  # a log line is an IPC call too
                pb_utils.Logger.log_error(f"encode failed for {len(jobs)} request(s): {error!r}")
            return [Refusal("internal", f"encoding failed: {error}")] * len(jobs)
        self.metrics.add("nvembed_forward_passes_total", result.passes)
        self.metrics.add("nvembed_padded_tokens_total", result.padded_tokens)
        return split(
            result.embeddings, result.token_counts, result.truncated, jobs, abandoned, self.encoder.max_length, self.dtype
        )

    def _respond(self, answer, held):
        """The response, with the outputs its request asked for, and the metrics of the texts it carries."""
        for prompt, row_counts in zip(held.job.prompts, answer.token_counts, strict=True):
            self.metrics.add("nvembed_texts_total", len(row_counts), prompt=prompt)
            self.metrics.add("nvembed_tokens_total", int(row_counts.sum()), prompt=prompt)
        self.metrics.add("nvembed_truncated_texts_total", int(answer.truncated.sum()))
        outputs = {
            contract.EMBEDDINGS_OUTPUT: np.ascontiguousarray(answer.embeddings),
            contract.TOKEN_COUNTS_OUTPUT: answer.token_counts,
            contract.TRUNCATED_OUTPUT: answer.truncated.astype(bool),
        }
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, outputs[name]) for name in outputs if name in held.wanted])

    def _refusal(self, refusal):
        """An error response; its message starts with the reason (reasons.REASONS)."""
        self.metrics.rejected(refusal.reason)
        code = getattr(pb_utils.TritonError, REASONS[refusal.reason].triton_code)
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{refusal.reason}: {refusal.message}", code))


class Held:
    """A request the encoder has taken on, until its response is sent."""

    def __init__(self, request, sender, wanted, taken):
        self.request, self.sender, self.wanted, self.taken = request, sender, wanted, taken  # the request is kept until answered
        self.job = None
        self.answered = False
