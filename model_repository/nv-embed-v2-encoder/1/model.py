"""The encoder model: holds the weights and computes. max_batch_size > 0 with dynamic batching, so
concurrent requests (from the public model, or from clients that send a batch dimension) arrive
together and share forward passes packed by token budget.
Inputs: `text` BYTES [B, N]; optional `prompt_name` ("query" | "document") and `instruction`
BYTES [B, 1]; request parameter `truncate` (END | START | NONE). Outputs: `embeddings` FP32
[B, N, D], L2-normalised; on request `token_counts` INT32 and `truncated` BOOL [B, N]."""

import json
import os
import time
from dataclasses import dataclass

# Before torch loads: idle OpenMP threads sleep instead of spinning, which on a CPU host would take
# cores from the front instances and the server. Measured on 2 cores: 45% less CPU per request.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from nvembed_triton import contract  # noqa: E402
from nvembed_triton.encoders import load_encoder  # noqa: E402
from nvembed_triton.lifecycle import CANCEL_TOKEN_PARAMETER, CancelBoard  # noqa: E402
from nvembed_triton.metrics import ModelMetrics  # noqa: E402
from nvembed_triton.settings import EncoderSettings, check_served_name, overridden, triton_parameters  # noqa: E402
from nvembed_triton.validation import (  # noqa: E402
    InvalidInputError,
    RequestLimits,
    decode_single,
    decode_texts,
    request_options,
)

OPTIONS = (contract.TRUNCATE_PARAMETER, CANCEL_TOKEN_PARAMETER)
CANCEL_CHECK_INTERVAL_S = 0.05  # how stale a request's "is anyone still waiting" answer may be


@dataclass
class _Job:
    """One request's share of an execute() call."""

    index: int  # in the requests list
    rows: list  # [B][N] texts
    instructions: list  # one per row
    labels: list  # the prompt per row, for the metrics
    truncate: str
    cancel_token: str | None


class TritonPythonModel:
    def initialize(self, args):
        started = time.monotonic()
        parameters = overridden(triton_parameters(json.loads(args["model_config"])))
        settings = EncoderSettings.from_parameters(parameters, args["model_instance_kind"], args["model_instance_device_id"])
        self.encoder = load_encoder(settings)
        self.dtype = settings.dtype
        self.limits = RequestLimits.from_parameters(parameters)
        check_served_name(args["model_name"], self.encoder.architecture)
        self.cancel_board = CancelBoard()
        self.metrics = ModelMetrics(args["model_name"])
        pb_utils.Logger.log_info(
            f"{args['model_name']}: {self.encoder.architecture} from {settings.model_dir} on {settings.device} "
            f"({settings.dtype}), dimension {self.encoder.dimension}, max_length {self.encoder.max_length}, "
            f"loaded in {time.monotonic() - started:.1f} s"
        )

    def execute(self, requests):
        self.metrics.executing(len(requests))
        try:
            return self._execute(requests)
        finally:
            self.metrics.executing(-len(requests))

    def _execute(self, requests):
        responses = [None] * len(requests)
        jobs = []
        for index, request in enumerate(requests):
            try:
                jobs.append(self._read_request(index, request))
            except InvalidInputError as error:
                responses[index] = self._refuse(str(error), pb_utils.TritonError.INVALID_ARG, "invalid_input")
        if jobs:
            self._encode_together(jobs, responses, requests)
        return responses

    def _read_request(self, index, request):
        options = request_options(request.parameters(), OPTIONS)
        tensor = pb_utils.get_input_tensor_by_name(request, contract.TEXT_INPUT)
        if tensor is None:
            raise InvalidInputError(f"send the texts as `{contract.TEXT_INPUT}` (BYTES, shape [B, N])")
        array = tensor.as_numpy()
        self.limits.check(array, contract.TEXT_INPUT)
        rows = array.reshape(array.shape[0], -1)
        texts = [decode_texts(row, f"{contract.TEXT_INPUT}[{i}]") for i, row in enumerate(rows)]
        if not texts[0]:
            raise InvalidInputError(f"`{contract.TEXT_INPUT}` is empty; send at least one text")
        prompt_names = self._per_row(request, contract.PROMPT_NAME_INPUT, len(texts))
        explicit = self._per_row(request, contract.INSTRUCTION_INPUT, len(texts))
        instructions, labels = [], []  # labels: the prompt, for the metrics
        for prompt_name, instruction in zip(prompt_names, explicit, strict=True):
            if prompt_name is not None and prompt_name not in contract.PROMPT_NAMES:
                raise InvalidInputError(f"`prompt_name` must be one of {list(contract.PROMPT_NAMES)}, got {prompt_name!r}")
            if instruction is None:
                prompt_name = prompt_name or contract.DOCUMENT_PROMPT
                instruction = self.encoder.default_instruction(prompt_name)
            self.encoder.check_instruction(instruction)
            instructions.append(instruction)
            labels.append(prompt_name or "custom")
        truncate = options.get(contract.TRUNCATE_PARAMETER, contract.TRUNCATE_END)
        return _Job(index, texts, instructions, labels, truncate, options.get(CANCEL_TOKEN_PARAMETER))

    @staticmethod
    def _per_row(request, name, rows):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return [None] * rows
        array = tensor.as_numpy().reshape(rows, -1)
        return [decode_single(row, f"{name}[{i}]") for i, row in enumerate(array)]

    def _encode_together(self, jobs, responses, requests):
        """One encode call over every text of every request, so the token-budget planner packs
        across requests; the result rows are then split back, in order, to their requests."""
        texts, instructions, truncations, owners = [], [], [], []  # owners[i]: the position in `jobs` of text i
        for position, job in enumerate(jobs):
            for row, instruction in zip(job.rows, job.instructions, strict=True):
                texts += row
                instructions += [instruction] * len(row)
                truncations += [job.truncate] * len(row)
                owners += [position] * len(row)
        abandoned = set()  # positions in `jobs` whose client has gone
        checked = dict.fromkeys(range(len(jobs)), time.monotonic())  # position -> when last asked

        def keep(batch):
            """Before each forward pass: drop the texts of requests nobody waits for any more. Each
            request is asked at most every CANCEL_CHECK_INTERVAL_S (is_cancelled() is an IPC call),
            so a short call, as most are, asks nothing."""
            now = time.monotonic()
            for position in {owners[i] for i in batch} - abandoned:
                if now - checked[position] < CANCEL_CHECK_INTERVAL_S:
                    continue
                checked[position] = now
                job = jobs[position]
                if requests[job.index].is_cancelled() or self.cancel_board.is_marked(job.cancel_token):
                    abandoned.add(position)
            return [i for i in batch if owners[i] not in abandoned]

        try:
            result = self.encoder.encode(texts, instructions, keep, truncations)
        except InvalidInputError as error:
            for job in jobs:
                responses[job.index] = self._refuse(str(error), pb_utils.TritonError.INVALID_ARG, "invalid_input")
            return
        except Exception as error:  # e.g. out of memory: these requests fail, the model stays up
            pb_utils.Logger.log_error(f"encode failed for {len(jobs)} request(s): {error!r}")
            for job in jobs:
                responses[job.index] = self._refuse(f"encoding failed: {error}", pb_utils.TritonError.INTERNAL, "internal")
            return
        self.metrics.add("nvembed_forward_passes_total", result.passes)
        self.metrics.add("nvembed_padded_tokens_total", result.padded_tokens)
        start = 0
        for position, job in enumerate(jobs):
            shape = (len(job.rows), len(job.rows[0]))
            span = slice(start, start + shape[0] * shape[1])
            start = span.stop
            embeddings = result.embeddings[span].reshape(*shape, -1)
            too_long = np.flatnonzero(result.truncated[span]) if job.truncate == contract.TRUNCATE_NONE else []
            if position in abandoned:
                cancelled = "the client cancelled the request"
                responses[job.index] = self._refuse(cancelled, pb_utils.TritonError.CANCELLED, "cancelled")
            elif len(too_long):
                first = int(too_long[0])
                message = (
                    f"text {first} is {result.token_counts[span][first]} tokens (or more), over max_length "
                    f"{self.encoder.max_length}, and truncate is NONE; shorten it or send truncate END or START"
                )
                responses[job.index] = self._refuse(message, pb_utils.TritonError.INVALID_ARG, "invalid_input")
            elif not np.isfinite(embeddings).all():  # an activation overflowed the dtype: never hand out a NaN vector
                message = f"the model overflowed in {self.dtype} on this input; serve it with dtype bf16 or fp32"
                responses[job.index] = self._refuse(message, pb_utils.TritonError.INTERNAL, "internal")
            else:
                counts, truncated = result.token_counts[span], result.truncated[span]
                responses[job.index] = self._respond(embeddings, counts, truncated, shape, job.labels)

    def _respond(self, embeddings, token_counts, truncated, shape, labels):
        """The response, and the metrics of the texts it carries."""
        for label, row_counts in zip(labels, token_counts.reshape(shape), strict=True):
            self.metrics.add("nvembed_texts_total", len(row_counts), prompt=label)
            self.metrics.add("nvembed_tokens_total", int(row_counts.sum()), prompt=label)
        self.metrics.add("nvembed_truncated_texts_total", int(truncated.sum()))
        return pb_utils.InferenceResponse(
            [
                pb_utils.Tensor(contract.EMBEDDINGS_OUTPUT, np.ascontiguousarray(embeddings)),
                pb_utils.Tensor(contract.TOKEN_COUNTS_OUTPUT, token_counts.reshape(shape).astype(np.int32)),
                pb_utils.Tensor(contract.TRUNCATED_OUTPUT, truncated.reshape(shape).astype(bool)),
            ]
        )

    def _refuse(self, message, code, reason):
        """An error response; its message starts with the reason (lifecycle.REASON_CODES)."""
        self.metrics.rejected(reason)
        return _error(f"{reason}: {message}", code)


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
