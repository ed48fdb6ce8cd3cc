import numpy as np
import tritonclient.grpc as grpcclient

# Create Triton client
triton_client = grpcclient.InferenceServerClient(url="localhost:8001")

query = "How do neural networks learn patterns from examples?"
documents = [
    "Neural networks learn through iterative training.",
    "Deep learning models adjust their weights through backpropagation.",
    "Market prices are determined by supply and demand.",
    "The recipe for chocolate chip cookies includes flour and sugar.",
]

# Get query embedding
input_query = grpcclient.InferInput("query", [1], "BYTES")
query_data = np.array([query], dtype=object)
input_query.set_data_from_numpy(query_data)

output = grpcclient.InferRequestedOutput("embeddings")
query_result = triton_client.infer(model_name="nv-embed-v2", inputs=[input_query], outputs=[output])
query_embedding = query_result.as_numpy("embeddings")

# Get document embeddings
input_docs = grpcclient.InferInput("documents", [1, len(documents)], "BYTES")
docs_data = np.array([documents], dtype=object)
input_docs.set_data_from_numpy(docs_data)

doc_result = triton_client.infer(model_name="nv-embed-v2", inputs=[input_docs], outputs=[output])
doc_embeddings = doc_result.as_numpy("embeddings")

# Calculate similarity scores (cosine similarity via dot product)
# Embeddings are already L2-normalized
if query_embedding.ndim == 2:
    query_embedding = query_embedding[0]

scores = []
for i in range(len(documents)):
    # Dot product of normalized vectors = cosine similarity
    score = np.dot(query_embedding, doc_embeddings[i])
    scores.append(score)

# Rank documents by similarity
ranked_indices = np.argsort(scores)[::-1]

print("Ranked documents (most relevant first):")
for rank, idx in enumerate(ranked_indices, 1):
    print(f"{rank}. Score: {scores[idx]:.4f} - {documents[idx][:80]}...")
