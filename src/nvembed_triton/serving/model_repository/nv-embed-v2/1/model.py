"""The public model: the client contract (`query` BYTES [1] or `documents` BYTES [1, N] ->
`embeddings` FP32 [1 or N, D]). It validates and routes; the encoder model `<name>-encoder` batches
concurrent requests and computes. Each instance holds up to `requests_per_instance` requests at
once, each waiting on the encoder on a thread of its own: execute() hands a request over and
returns, and the answer goes out through the request's response sender. A few warm processes
serve a lone query faster than many cold ones (Triton gives a request to the instance idle the
longest, whose process then runs cold: bench/RESULTS.md, "Public instances")."""

# The Python backend imports asyncio when execute() returns (to ask whether it returned a coroutine):
# ~20 ms on each instance's first request, then never again. Imported here, it is paid at load.
import asyncio  # noqa: F401
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from nvembed_triton.protocol import contract
from nvembed_triton.protocol.errors import InvalidInputError
from nvembed_triton.protocol.lifecycle import (
    CANCEL_TOKEN_PARAMETER,
    CANCELLED_MESSAGE,
    CLOSED_MESSAGE,
    CancelBoard,
    is_closed,
)
from nvembed_triton.protocol.reasons import REASONS, reason_of
from nvembed_triton.protocol.request_rules import encoder_model_for, public_request
from nvembed_triton.protocol.settings import PUBLIC, model_settings, triton_parameters
from nvembed_triton.protocol.validation import RequestLimits
from nvembed_triton.serving.client_watch import ClientWatch
from nvembed_triton.serving.memory import cache_this_thread
from nvembed_triton.serving.metrics import PUBLIC_COUNTERS, ModelMetrics

# When a waiting instance asks whether its client is still there: at once, then after
# CANCEL_POLL_FIRST_S, each wait twice the one before, at most CANCEL_POLL_MAX_S (client_watch.py).
# A client that leaves is noticed within about its own wait so far, and at most CANCEL_POLL_MAX_S;
# a request's own timeout is kept to the millisecond without asking. (Triton does not end a
# forwarded request at a timeout once the encoder has taken it: bench/bench_deadline.py.)
CANCEL_POLL_FIRST_S = 0.2
CANCEL_POLL_MAX_S = 1.0
# Threads that send forwarded requests that have a timeout of their own, beyond one per request an
# instance holds: forwarded requests still running after their timeout passed (the encoder drops
# their remaining work at its next pass) hold a sender until then, and must not hold up the next.
SPARE_SENDER_THREADS = 4
FINALIZE_WAIT_S = 10.0  # how long an unload waits for the requests an instance holds to be answered
OUTPUTS = (contract.EMBEDDINGS_OUTPUT, contract.TOKEN_COUNTS_OUTPUT, contract.TRUNCATED_OUTPUT)
TIMEOUT_MESSAGE = "the request's timeout passed before its embeddings were ready"


class TritonPythonModel:
    def initialize(self, args):
        values = model_settings(PUBLIC, triton_parameters(json.loads(args["model_config"])))
        self.limits = RequestLimits.from_settings(values)
        self.instructions = {
            contract.QUERY_PROMPT: values["query_instruction"],
            contract.DOCUMENT_PROMPT: values["document_instruction"],
        }
        self.encoder_model = encoder_model_for(args["model_name"], values["encoder_model"])
        self.cancel_board = CancelBoard()
        self.metrics = ModelMetrics(args["model_name"], PUBLIC_COUNTERS)
        self.capacity = values["requests_per_instance"]  # requests this instance holds at once
        # execute() waits for a free slot: requests beyond them stay in Triton's queue, which is
        # bounded and served in priority order (config.pbtxt), not in this process.
        self.slots = threading.BoundedSemaphore(self.capacity)
        self.answerers = ThreadPoolExecutor(self.capacity, thread_name_prefix="answer", initializer=cache_this_thread)
        self.senders = ThreadPoolExecutor(
            self.capacity + SPARE_SENDER_THREADS, thread_name_prefix="forward", initializer=cache_this_thread
        )
        self.watch = ClientWatch(self.cancel_board.mark, self.cancel_board.clear, CANCEL_POLL_FIRST_S, CANCEL_POLL_MAX_S)

    def finalize(self):
        # Requests still held are answered first (the encoder answers or refuses each), for a while.
        deadline = time.monotonic() + FINALIZE_WAIT_S
        for _ in range(self.capacity):
            self.slots.acquire(timeout=max(0.0, deadline - time.monotonic()))
        self.answerers.shutdown(wait=False, cancel_futures=True)
        self.watch.close()
        self.senders.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()

    def execute(self, requests):
        for request in requests:
            self.slots.acquire()
            self.metrics.hold(1)  # until answered: a drain waits for the gauge to come down
            self.answerers.submit(self._answer_and_send, request, request.get_response_sender())
        return None  # every response goes through its request's response sender

    def _answer_and_send(self, request, sender):
        try:
            try:
                response = self._answer(request)
            except Exception as error:  # a request must get an answer whatever goes wrong
                response = _refuse("internal", f"answering failed: {error!r}")
            if response.has_error():
                self.metrics.rejected(reason_of(response.error().message()).name)
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as error:  # nothing more can be sent for this request: say so in the log
            with self.metrics.ipc_lock:  # a log line is an IPC call too
                pb_utils.Logger.log_error(f"sending a response failed: {error!r}")
        finally:
            self.metrics.release(1)
            self.slots.release()

    def _answer(self, request):
        if is_closed():  # a drain has served what was queued; this request came later
            return _refuse("shutting_down", CLOSED_MESSAGE)
        timeout_us = request.timeout()  # the request's own timeout (tritonclient's `timeout`), 0 if none
        deadline = time.monotonic() + timeout_us / 1e6 if timeout_us else None

        def tensor(name):
            found = pb_utils.get_input_tensor_by_name(request, name)
            return None if found is None else found.as_numpy()

        try:
            query, documents = tensor(contract.QUERY_INPUT), tensor(contract.DOCUMENTS_INPUT)
            forward = public_request(query, documents, request.parameters(), self.limits, self.instructions)
        except InvalidInputError as error:
            return _refuse("invalid_input", str(error))
        inputs = [
            pb_utils.Tensor(contract.TEXT_INPUT, forward.texts),
            pb_utils.Tensor(contract.PROMPT_NAME_INPUT, np.array([[forward.prompt_name.encode()]], dtype=object)),
        ]
        if forward.instruction is not None:
            inputs.append(pb_utils.Tensor(contract.INSTRUCTION_INPUT, np.array([[forward.instruction.encode()]], dtype=object)))
        # Only what the client asked for (Triton lists every output when it named none): the seed's
        # client asks for embeddings alone, and each tensor costs both hops shared memory and time.
        wanted = [name for name in OUTPUTS if name in request.requested_output_names()]
        response = self._forward(request, inputs, wanted, deadline, forward.parameters)
        if isinstance(response, Exception):
            return _refuse("internal", f"forwarding to the encoder failed: {response}")
        if response is None:
            return _refuse("cancelled", CANCELLED_MESSAGE if deadline is None else TIMEOUT_MESSAGE)
        if response.has_error():  # the encoder's message, with the code BLS lost restored from it
            message = response.error().message()
            return _error(message, getattr(pb_utils.TritonError, reason_of(message).triton_code))
        # The encoder's [1, N, ...] outputs become the contract's [N, ...], copied: as_numpy() is a view
        # into the BLS response's shared memory, which may be reused once `response` is gone.
        outputs = [np.array(pb_utils.get_output_tensor_by_name(response, name).as_numpy()[0]) for name in wanted]
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, array) for name, array in zip(wanted, outputs, strict=True)])

    def _forward(self, request, inputs, wanted, deadline, parameters):
        """The encoder's response (or what forwarding raised), or None once the client has gone or
        the deadline passed. A forwarded request nobody waits for any more is marked on the cancel
        board, so the encoder skips the rest of its work (and answers it once its call ends)."""
        token = self.cancel_board.new_token()
        parameters = {**parameters, **({CANCEL_TOKEN_PARAMETER: token} if token else {})}
        forwarded = pb_utils.InferenceRequest(
            model_name=self.encoder_model,
            inputs=inputs,
            requested_output_names=wanted,
            parameters=parameters,
            # The client's request id travels on (Triton's log lines name it). Not trace=request.trace():
            # this request is released when execute() returns, its trace with it, and a child trace
            # spawned from it afterwards crashed tritonserver 2.51 (SIGSEGV, tracing on).
            request_id=request.request_id(),
        )
        if deadline is not None:
            return self._forward_until(request, forwarded, token, deadline)
        with self.watch.watching(request.is_cancelled, token) as gone:  # sent from this thread, the client watched meanwhile
            try:
                response = forwarded.exec()
            except Exception as error:  # answered as internal by the caller
                return error
            return None if gone() else response

    def _forward_until(self, request, forwarded, token, deadline):
        """A request with a timeout of its own goes out on a sender thread while this one waits, so
        that it is answered at its timeout whatever the encoder is doing. The client is asked after
        only until this returns: its response is sent after (client_watch.py says why)."""
        outcome, marked = [], []
        done = threading.Event()

        def send():
            try:
                outcome.append(forwarded.exec())
            except Exception as error:  # handed to the waiting thread, which returns it
                outcome.append(error)
            finally:
                done.set()
                if marked:  # else there is no mark to clear: the file system is left alone
                    self.cancel_board.clear(token)

        self.senders.submit(send)
        poll_s = 0.0  # the first look at once: the client may have gone while this request was queued
        while True:
            if done.wait(min(poll_s, max(0.0, deadline - time.monotonic()))):
                return outcome[0]
            if time.monotonic() >= deadline or request.is_cancelled():
                marked.append(token)  # before the mark: if send() misses it, done is set by then and it is cleared here
                self.cancel_board.mark(token)
                if done.is_set():  # finished meanwhile: leave no mark behind
                    self.cancel_board.clear(token)
                return None
            poll_s = min(max(2 * poll_s, CANCEL_POLL_FIRST_S), CANCEL_POLL_MAX_S)


def _refuse(reason, message):
    """An error response whose message starts with its reason, as the encoder's do."""
    return _error(f"{reason}: {message}", getattr(pb_utils.TritonError, REASONS[reason].triton_code))


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
