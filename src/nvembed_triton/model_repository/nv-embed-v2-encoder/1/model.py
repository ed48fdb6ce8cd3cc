"""The encoder model: holds the weights and computes. max_batch_size > 0 with dynamic batching, so
concurrent requests (from the public model, or from clients that send a batch dimension) arrive
together and share forward passes packed by token budget.
Inputs: `text` BYTES [B, N]; optional `prompt_name` ("query" | "document") and `instruction`
BYTES [B, 1]; request parameter `truncate` (END | START | NONE). Outputs: `embeddings` FP32
[B, N, D], L2-normalised; on request `token_counts` INT32 and `truncated` BOOL [B, N]."""

import json
import os
import time

# Before torch loads: idle OpenMP threads sleep instead of spinning. On a CPU host spinning takes
# cores from the front instances and the server: through the server, PASSIVE gave the most
# queries/s at 1, 16 and 64 clients (ACTIVE -27% at 1 client, the default -12% at 64;
# bench/RESULTS.md). On a GPU host the CPU threads mostly wait for the GPU, so the same holds.
# An OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from nvembed_triton import contract  # noqa: E402
from nvembed_triton.checkpoint import check_served_name  # noqa: E402
from nvembed_triton.encoders import load_encoder  # noqa: E402
from nvembed_triton.errors import InvalidInputError  # noqa: E402
from nvembed_triton.lifecycle import REASON_CODES, CancelBoard  # noqa: E402
from nvembed_triton.metrics import ModelMetrics  # noqa: E402
from nvembed_triton.request_rules import Refusal, combine, encoder_request, split  # noqa: E402
from nvembed_triton.settings import ENCODER, EncoderSettings, model_settings, triton_parameters  # noqa: E402
from nvembed_triton.validation import RequestLimits  # noqa: E402

CANCEL_CHECK_INTERVAL_S = 0.05  # how stale a request's "is anyone still waiting" answer may be


class TritonPythonModel:
    def initialize(self, args):
        started = time.monotonic()
        values = model_settings(ENCODER, triton_parameters(json.loads(args["model_config"])))
        settings = EncoderSettings.from_settings(values, args["model_instance_kind"], args["model_instance_device_id"])
        self.encoder = load_encoder(settings)
        self.dtype = settings.dtype
        self.limits = RequestLimits.from_settings(values)
        check_served_name(args["model_name"], self.encoder.architecture)
        self.cancel_board = CancelBoard()
        self.metrics = ModelMetrics(args["model_name"])
        pb_utils.Logger.log_info(
            f"{args['model_name']}: {self.encoder.architecture.value} from {settings.model_dir} on {settings.device} "
            f"({settings.dtype}, linear layers: {self.encoder.linear_kernels}), dimension {self.encoder.dimension}, "
            f"max_length {self.encoder.max_length}, loaded in {time.monotonic() - started:.1f} s"
        )

    def execute(self, requests):
        with self.metrics.executing(len(requests)):
            return self._execute(requests)

    def _execute(self, requests):
        responses = [None] * len(requests)
        jobs, owners = [], []  # owners[j]: the index in `requests` of jobs[j]
        for index, request in enumerate(requests):
            try:
                jobs.append(self._read_request(request))
                owners.append(index)
            except InvalidInputError as error:
                responses[index] = self._refuse(Refusal("invalid_input", str(error)))
        if jobs:
            outcomes = self._encode_together(jobs, [requests[i] for i in owners])
            for index, job, outcome in zip(owners, jobs, outcomes, strict=True):
                responses[index] = self._refuse(outcome) if isinstance(outcome, Refusal) else self._respond(outcome, job)
        return responses

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

    def _encode_together(self, jobs, requests):
        """One encode call over every text of every request (request_rules.combine), so the
        token-budget planner packs across requests; its rows are then split back, in order."""
        call = combine(jobs)
        abandoned = set()  # positions in `jobs` whose client has gone
        checked = dict.fromkeys(range(len(jobs)), time.monotonic())  # position -> when last asked

        def keep(batch):
            """Before each forward pass: drop the texts of requests nobody waits for any more. Each
            request is asked at most every CANCEL_CHECK_INTERVAL_S (is_cancelled() is an IPC call),
            so a short call, as most are, asks nothing."""
            now = time.monotonic()
            for position in {call.owners[i] for i in batch} - abandoned:
                if now - checked[position] < CANCEL_CHECK_INTERVAL_S:
                    continue
                checked[position] = now
                if requests[position].is_cancelled() or self.cancel_board.is_marked(jobs[position].cancel_token):
                    abandoned.add(position)
            return [i for i in batch if call.owners[i] not in abandoned]

        try:
            result = self.encoder.encode(call.texts, call.instructions, keep, call.truncations)
        except InvalidInputError as error:
            return [Refusal("invalid_input", str(error))] * len(jobs)
        except Exception as error:  # e.g. out of memory: these requests fail, the model stays up
            pb_utils.Logger.log_error(f"encode failed for {len(jobs)} request(s): {error!r}")
            return [Refusal("internal", f"encoding failed: {error}")] * len(jobs)
        self.metrics.add("nvembed_forward_passes_total", result.passes)
        self.metrics.add("nvembed_padded_tokens_total", result.padded_tokens)
        return split(
            result.embeddings, result.token_counts, result.truncated, jobs, abandoned, self.encoder.max_length, self.dtype
        )

    def _respond(self, answer, job):
        """The response, and the metrics of the texts it carries."""
        for prompt, row_counts in zip(job.prompts, answer.token_counts, strict=True):
            self.metrics.add("nvembed_texts_total", len(row_counts), prompt=prompt)
            self.metrics.add("nvembed_tokens_total", int(row_counts.sum()), prompt=prompt)
        self.metrics.add("nvembed_truncated_texts_total", int(answer.truncated.sum()))
        return pb_utils.InferenceResponse(
            [
                pb_utils.Tensor(contract.EMBEDDINGS_OUTPUT, np.ascontiguousarray(answer.embeddings)),
                pb_utils.Tensor(contract.TOKEN_COUNTS_OUTPUT, answer.token_counts),
                pb_utils.Tensor(contract.TRUNCATED_OUTPUT, answer.truncated.astype(bool)),
            ]
        )

    def _refuse(self, refusal):
        """An error response; its message starts with the reason (lifecycle.REASON_CODES)."""
        self.metrics.rejected(refusal.reason)
        code = getattr(pb_utils.TritonError, REASON_CODES[refusal.reason])
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{refusal.reason}: {refusal.message}", code))
