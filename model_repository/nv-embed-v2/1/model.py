"""The public model: the client contract (`query` BYTES [1] or `documents` BYTES [1, N] ->
`embeddings` FP32 [1 or N, D]). It validates and routes; the encoder model `<name>-encoder` batches
concurrent requests and computes. CPU instances: many of them can wait on the encoder at once."""

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from nvembed_triton import contract
from nvembed_triton.lifecycle import (
    CANCEL_TOKEN_PARAMETER,
    CLOSED_MESSAGE,
    REASON_CODES,
    CancelBoard,
    is_closed,
    reason_of,
)
from nvembed_triton.metrics import ModelMetrics
from nvembed_triton.settings import triton_parameters
from nvembed_triton.validation import InvalidInputError, RequestLimits, decode_texts, request_options

# How often a waiting instance asks whether its client is still there (one IPC call each time).
CANCEL_POLL_S = 0.05
CANCELLED_MESSAGE = "the client cancelled the request"
OUTPUTS = (contract.EMBEDDINGS_OUTPUT, contract.TOKEN_COUNTS_OUTPUT, contract.TRUNCATED_OUTPUT)
OPTIONS = (contract.INSTRUCTION_PARAMETER, contract.TRUNCATE_PARAMETER)
TIMEOUT_MESSAGE = "the request's timeout passed before its embeddings were ready"


class TritonPythonModel:
    def initialize(self, args):
        parameters = triton_parameters(json.loads(args["model_config"]))
        self.limits = RequestLimits.from_parameters(parameters)
        # Empty: the model's own instruction for that prompt (NV-Embed-v2: the retrieval instruction).
        self.instructions = {
            contract.QUERY_PROMPT: parameters.get("query_instruction", ""),
            contract.DOCUMENT_PROMPT: parameters.get("document_instruction", ""),
        }
        self.encoder_model = parameters.get("encoder_model") or contract.encoder_model_name(args["model_name"])
        self.cancel_board = CancelBoard()
        self.metrics = ModelMetrics(args["model_name"])

    def execute(self, requests):
        self.metrics.executing(len(requests))
        try:
            return [self._respond(request) for request in requests]
        finally:
            self.metrics.executing(-len(requests))

    def _respond(self, request):
        response = self._answer(request)
        if response.has_error():
            self.metrics.rejected(reason_of(response.error().message()))
        return response

    def _answer(self, request):
        if is_closed():  # a drain has served what was queued; this request came later
            return _refuse("shutting_down", CLOSED_MESSAGE)
        if request.is_cancelled():  # the client gave up while the request was queued
            return _refuse("cancelled", CANCELLED_MESSAGE)
        timeout_us = request.timeout()  # the request's own timeout (tritonclient's `timeout`), 0 if none
        deadline = time.monotonic() + timeout_us / 1e6 if timeout_us else None
        try:
            options = request_options(request.parameters(), OPTIONS)
            texts, prompt_name = self._read_inputs(request)
        except InvalidInputError as error:
            return _refuse("invalid_input", str(error))
        inputs = [
            pb_utils.Tensor(contract.TEXT_INPUT, texts.reshape(1, -1)),
            pb_utils.Tensor(contract.PROMPT_NAME_INPUT, np.array([[prompt_name.encode()]], dtype=object)),
        ]
        # This request's instruction (even ""), else the configured one, else (none sent) the model's own.
        instruction = options.get(contract.INSTRUCTION_PARAMETER, self.instructions[prompt_name])
        if instruction or contract.INSTRUCTION_PARAMETER in options:
            inputs.append(pb_utils.Tensor(contract.INSTRUCTION_INPUT, np.array([[instruction.encode()]], dtype=object)))
        truncate = {k: v for k, v in options.items() if k == contract.TRUNCATE_PARAMETER}
        response = self._forward(request, inputs, deadline, truncate)
        if isinstance(response, Exception):
            return _refuse("internal", f"forwarding to the encoder failed: {response}")
        if response is None:
            return _refuse("cancelled", CANCELLED_MESSAGE if deadline is None else TIMEOUT_MESSAGE)
        if response.has_error():  # the encoder's message, with the code BLS lost restored from it
            message = response.error().message()
            return _error(message, getattr(pb_utils.TritonError, REASON_CODES[reason_of(message)]))
        # The encoder's [1, N, ...] outputs become the contract's [N, ...].
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor(name, pb_utils.get_output_tensor_by_name(response, name).as_numpy()[0]) for name in OUTPUTS]
        )

    def _forward(self, request, inputs, deadline, parameters):
        """The encoder's response, or None once the client has cancelled or the deadline passed.
        The request goes out on a thread while this one watches the client: if it goes, the
        forwarded request is marked on the cancel board so the encoder skips the rest of its work."""
        token = self.cancel_board.new_token()
        parameters = {**parameters, **({CANCEL_TOKEN_PARAMETER: token} if token else {})}
        forwarded = pb_utils.InferenceRequest(
            model_name=self.encoder_model,
            inputs=inputs,
            requested_output_names=list(OUTPUTS),
            parameters=parameters,
        )
        outcome = []
        done = threading.Event()

        def send():
            try:
                outcome.append(forwarded.exec())
            except Exception as error:  # handed to the waiting thread, which raises it
                outcome.append(error)
            finally:
                done.set()
                self.cancel_board.clear(token)

        threading.Thread(target=send, daemon=True).start()
        while not done.wait(CANCEL_POLL_S):
            if request.is_cancelled() or (deadline is not None and time.monotonic() > deadline):
                self.cancel_board.mark(token)
                if done.is_set():  # finished meanwhile: leave no mark behind
                    self.cancel_board.clear(token)
                return None
        return outcome[0]

    def _read_inputs(self, request):
        """The texts (checked, still as bytes) and the prompt they get."""
        query = pb_utils.get_input_tensor_by_name(request, contract.QUERY_INPUT)
        documents = pb_utils.get_input_tensor_by_name(request, contract.DOCUMENTS_INPUT)
        if query is not None and documents is not None:
            raise InvalidInputError("send either `query` or `documents`, not both in the same request")
        if query is None and documents is None:
            raise InvalidInputError(
                "send one input: `query` (BYTES, shape [1]: one query text) or "
                "`documents` (BYTES, shape [1, N]: N document texts)"
            )
        if query is not None:
            texts = query.as_numpy()
            if texts.size != 1:
                raise InvalidInputError(f"`query` must hold exactly one text (shape [1]), got shape {list(texts.shape)}")
            self.limits.check(texts, contract.QUERY_INPUT)
            decode_texts(texts, contract.QUERY_INPUT)
            return texts, contract.QUERY_PROMPT
        texts = documents.as_numpy()
        self.limits.check(texts, contract.DOCUMENTS_INPUT)
        decode_texts(texts, contract.DOCUMENTS_INPUT)
        return texts, contract.DOCUMENT_PROMPT


def _refuse(reason, message):
    """An error response whose message starts with its reason, as the encoder's do."""
    return _error(f"{reason}: {message}", getattr(pb_utils.TritonError, REASON_CODES[reason]))


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
