"""The wire contract: model names, tensor names and instructions shared by the model,
the client and the tests. Defined once here; nothing else spells these strings."""

PUBLIC_MODEL = "nv-embed-v2"

# The model takes exactly one of these per request (max_batch_size 0: no batch dimension).
QUERY_INPUT = "query"  # BYTES [1]
DOCUMENTS_INPUT = "documents"  # BYTES [1, N]
EMBEDDINGS_OUTPUT = "embeddings"  # FP32 [1, D] for a query, [N, D] for N documents
# Usage, on request (a client that asks only for `embeddings` never sees them): per text, the
# tokens it was embedded with and whether it was cut to max_length. [N].
TOKEN_COUNTS_OUTPUT = "token_counts"  # INT32
TRUNCATED_OUTPUT = "truncated"  # BOOL

# Per-request options are KServe request parameters, declared in options.py. Truncation's values:
TRUNCATE_END, TRUNCATE_START, TRUNCATE_NONE = "END", "START", "NONE"  # keep the start (default), the end, or refuse
TRUNCATIONS = (TRUNCATE_END, TRUNCATE_START, TRUNCATE_NONE)

QUERY_PROMPT = "query"
DOCUMENT_PROMPT = "document"
PROMPT_NAMES = (QUERY_PROMPT, DOCUMENT_PROMPT)

RETRIEVAL_TASK = "Given a question, retrieve passages that answer the question"


def nvembed_query_instruction(task: str) -> str:
    """NV-Embed-v2's query prefix for a task description."""
    return f"Instruct: {task}\nQuery: "


# An operator may require a key on inference (serve.sh's setting inference_key). Clients send it in
# this header (gRPC metadata alike); Triton forwards it to the model as a request parameter.
INFERENCE_KEY_HEADER = "nvembed-inference-key"
