"""The public model: the client contract (`query` BYTES [1] or `documents` BYTES [1, N] ->
`embeddings` FP32 [1 or N, D]). It validates and routes; the encoder model `<name>-encoder` batches
concurrent requests and computes. CPU instances: many of them can wait on the encoder at once."""

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from nvembed_triton import contract
from nvembed_triton.lifecycle import CANCEL_TOKEN_PARAMETER, CLOSED_MESSAGE, CancelBoard, ExecutingGauge, is_closed
from nvembed_triton.settings import triton_parameters
from nvembed_triton.validation import InvalidInputError, RequestLimits, decode_texts

# How often a waiting instance asks whether its client is still there (one IPC call each time).
CANCEL_POLL_S = 0.05
CANCELLED_MESSAGE = "the client cancelled the request"
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
        self.executing = ExecutingGauge(args["model_name"])
        self.cancel_board = CancelBoard()

    def execute(self, requests):
        self.executing.add(len(requests))
        try:
            return [self._respond(request) for request in requests]
        finally:
            self.executing.add(-len(requests))

    def _respond(self, request):
        if is_closed():  # a drain has served what was queued; this request came later
            return _error(CLOSED_MESSAGE, pb_utils.TritonError.UNAVAILABLE)
        if request.is_cancelled():  # the client gave up while the request was queued
            return _error(CANCELLED_MESSAGE, pb_utils.TritonError.CANCELLED)
        timeout_us = request.timeout()  # the request's own timeout (tritonclient's `timeout`), 0 if none
        deadline = time.monotonic() + timeout_us / 1e6 if timeout_us else None
        try:
            texts, prompt_name = self._read_inputs(request)
        except InvalidInputError as error:
            return _error(str(error), pb_utils.TritonError.INVALID_ARG)
        inputs = [
            pb_utils.Tensor(contract.TEXT_INPUT, texts.reshape(1, -1)),
            pb_utils.Tensor(contract.PROMPT_NAME_INPUT, np.array([[prompt_name.encode()]], dtype=object)),
        ]
        if self.instructions[prompt_name]:
            instruction = np.array([[self.instructions[prompt_name].encode()]], dtype=object)
            inputs.append(pb_utils.Tensor(contract.INSTRUCTION_INPUT, instruction))
        response = self._forward(request, inputs, deadline)
        if isinstance(response, Exception):
            return _error(f"forwarding to the encoder failed: {response}", pb_utils.TritonError.INTERNAL)
        if response is None:
            return _error(CANCELLED_MESSAGE if deadline is None else TIMEOUT_MESSAGE, pb_utils.TritonError.CANCELLED)
        if response.has_error():
            error = response.error()
            if "not healthy" in error.message():  # its stub died; the launcher is restarting the server
                return _error(f"the encoder is restarting: {error.message()}", pb_utils.TritonError.UNAVAILABLE)
            return pb_utils.InferenceResponse(error=error)  # keeps the encoder's message and code
        embeddings = pb_utils.get_output_tensor_by_name(response, contract.EMBEDDINGS_OUTPUT).as_numpy()[0]
        return pb_utils.InferenceResponse([pb_utils.Tensor(contract.EMBEDDINGS_OUTPUT, embeddings)])

    def _forward(self, request, inputs, deadline):
        """The encoder's response, or None once the client has cancelled or the deadline passed.
        The request goes out on a thread while this one watches the client: if it goes, the
        forwarded request is marked on the cancel board so the encoder skips the rest of its work."""
        token = self.cancel_board.new_token()
        parameters = {CANCEL_TOKEN_PARAMETER: token} if token else {}
        forwarded = pb_utils.InferenceRequest(
            model_name=self.encoder_model,
            inputs=inputs,
            requested_output_names=[contract.EMBEDDINGS_OUTPUT],
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


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
