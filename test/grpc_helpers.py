"""Raw tritonclient calls in the shapes of the user's contract, for tests that check the wire."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient

from nvembed_triton.protocol import contract


def bytes_input(name: str, values: list, shape: list[int]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, shape, "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=object).reshape(shape))
    return tensor


def infer(client, model: str, inputs: list[grpcclient.InferInput], parameters: dict | None = None) -> np.ndarray:
    outputs = [grpcclient.InferRequestedOutput(contract.EMBEDDINGS_OUTPUT)]
    result = client.infer(model, inputs, outputs=outputs, parameters=parameters)
    return result.as_numpy(contract.EMBEDDINGS_OUTPUT)


def embed_query(client, model: str, text) -> np.ndarray:
    """[1, D] for one query (the model adds its query instruction)."""
    return infer(client, model, [bytes_input(contract.QUERY_INPUT, [text], [1])])


def embed_documents(client, model: str, texts: list) -> np.ndarray:
    """[N, D] for N documents."""
    return infer(client, model, [bytes_input(contract.DOCUMENTS_INPUT, [texts], [1, len(texts)])])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
