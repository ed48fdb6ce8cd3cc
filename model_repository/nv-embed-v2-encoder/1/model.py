"""The encoder model: holds the weights and computes. max_batch_size > 0 with dynamic batching, so
concurrent requests (from the public model, or from clients that send a batch dimension) arrive
together and share forward passes packed by token budget.
Inputs: `text` BYTES [B, N]; optional `prompt_name` ("query" | "document") and `instruction`
BYTES [B, 1]. Output: `embeddings` FP32 [B, N, D], L2-normalised."""

import json
import os
import time

# Before torch loads: idle OpenMP threads sleep instead of spinning, which on a CPU host would take
# cores from the front instances and the server. Measured on 2 cores: 45% less CPU per request.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from nvembed_triton import contract  # noqa: E402
from nvembed_triton.encoders import load_encoder  # noqa: E402
from nvembed_triton.lifecycle import CANCEL_TOKEN_PARAMETER, CancelBoard, ExecutingGauge  # noqa: E402
from nvembed_triton.settings import EncoderSettings, check_served_name, overridden, triton_parameters  # noqa: E402
from nvembed_triton.validation import InvalidInputError, RequestLimits, decode_single, decode_texts  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        started = time.monotonic()
        parameters = overridden(triton_parameters(json.loads(args["model_config"])))
        settings = EncoderSettings.from_parameters(parameters, args["model_instance_kind"], args["model_instance_device_id"])
        self.encoder = load_encoder(settings)
        self.dtype = settings.dtype
        self.limits = RequestLimits.from_parameters(parameters)
        check_served_name(args["model_name"], self.encoder.architecture)
        self.executing = ExecutingGauge(args["model_name"])
        self.cancel_board = CancelBoard()
        pb_utils.Logger.log_info(
            f"{args['model_name']}: {self.encoder.architecture} from {settings.model_dir} on {settings.device} "
            f"({settings.dtype}), dimension {self.encoder.dimension}, max_length {self.encoder.max_length}, "
            f"loaded in {time.monotonic() - started:.1f} s"
        )

    def execute(self, requests):
        self.executing.add(len(requests))
        try:
            return self._execute(requests)
        finally:
            self.executing.add(-len(requests))

    def _execute(self, requests):
        responses = [None] * len(requests)
        jobs = []  # (request index, texts [B, N], one instruction per row)
        for index, request in enumerate(requests):
            try:
                jobs.append((index, *self._read_request(request)))
            except InvalidInputError as error:
                responses[index] = _error(str(error), pb_utils.TritonError.INVALID_ARG)
        if jobs:
            self._encode_together(jobs, responses, requests)
        return responses

    def _read_request(self, request):
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
        instructions = []
        for prompt_name, instruction in zip(prompt_names, explicit, strict=True):
            if instruction is None:
                prompt_name = prompt_name or contract.DOCUMENT_PROMPT
                if prompt_name not in contract.PROMPT_NAMES:
                    raise InvalidInputError(f"`prompt_name` must be one of {list(contract.PROMPT_NAMES)}, got {prompt_name!r}")
                instruction = self.encoder.default_instruction(prompt_name)
            self.encoder.check_instruction(instruction)
            instructions.append(instruction)
        return texts, instructions

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
        texts, instructions, owners = [], [], []  # owners[i]: the position in `jobs` of text i
        for position, (_, rows, row_instructions) in enumerate(jobs):
            for row, instruction in zip(rows, row_instructions, strict=True):
                texts += row
                instructions += [instruction] * len(row)
                owners += [position] * len(row)
        abandoned = set()  # positions in `jobs` whose client has gone

        def keep(batch):
            """Before each forward pass: drop the texts of requests nobody waits for any more."""
            for position in {owners[i] for i in batch} - abandoned:
                request = requests[jobs[position][0]]
                token = json.loads(request.parameters() or "{}").get(CANCEL_TOKEN_PARAMETER)
                if request.is_cancelled() or self.cancel_board.is_marked(token):
                    abandoned.add(position)
            return [i for i in batch if owners[i] not in abandoned]

        try:
            embeddings = self.encoder.encode(texts, instructions, keep)
        except InvalidInputError as error:
            for index, *_ in jobs:
                responses[index] = _error(str(error), pb_utils.TritonError.INVALID_ARG)
            return
        except Exception as error:  # e.g. out of memory: these requests fail, the model stays up
            pb_utils.Logger.log_error(f"encode failed for {len(jobs)} request(s): {error!r}")
            for index, *_ in jobs:
                responses[index] = _error(f"encoding failed: {error}", pb_utils.TritonError.INTERNAL)
            return
        start = 0
        for position, (index, rows, _) in enumerate(jobs):
            count = len(rows) * len(rows[0])
            batch = embeddings[start : start + count].reshape(len(rows), len(rows[0]), -1)
            if position in abandoned:
                responses[index] = _error("the client cancelled the request", pb_utils.TritonError.CANCELLED)
            elif np.isfinite(batch).all():
                responses[index] = pb_utils.InferenceResponse(
                    [pb_utils.Tensor(contract.EMBEDDINGS_OUTPUT, np.ascontiguousarray(batch))]
                )
            else:  # an activation overflowed the dtype: never hand out a NaN vector
                message = f"the model overflowed in {self.dtype} on this input; serve it with dtype bf16 or fp32"
                responses[index] = _error(message, pb_utils.TritonError.INTERNAL)
            start += count


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
