import numpy as np
import tritonclient.grpc as grpcclient

# Create Triton client
triton_client = grpcclient.InferenceServerClient(url="localhost:8001")

# Query text
query = "How do neural networks learn patterns from examples?"

# Prepare input
input_query = grpcclient.InferInput("query", [1], "BYTES")
query_data = np.array([query], dtype=object)
input_query.set_data_from_numpy(query_data)

# Prepare output
output_embeddings = grpcclient.InferRequestedOutput("embeddings")

# Run inference
results = triton_client.infer(model_name="nv-embed-v2", inputs=[input_query], outputs=[output_embeddings])

# Get embeddings
embeddings = results.as_numpy("embeddings")
print(f"Query embedding shape: {embeddings.shape}")
print(f"Embedding norm: {np.linalg.norm(embeddings):.6f}")  # Should be ~1.0
