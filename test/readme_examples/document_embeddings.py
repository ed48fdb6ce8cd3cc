import numpy as np
import tritonclient.grpc as grpcclient

# Create Triton client
triton_client = grpcclient.InferenceServerClient(url="localhost:8001")

# Document texts
documents = [
    "Neural networks learn through iterative training.",
    "Deep learning models adjust their weights through backpropagation.",
    "Market prices are determined by supply and demand.",
]

# Prepare input - shape [1, num_documents]
input_documents = grpcclient.InferInput("documents", [1, len(documents)], "BYTES")
documents_data = np.array([documents], dtype=object)
input_documents.set_data_from_numpy(documents_data)

# Prepare output
output_embeddings = grpcclient.InferRequestedOutput("embeddings")

# Run inference
results = triton_client.infer(model_name="nv-embed-v2", inputs=[input_documents], outputs=[output_embeddings])

# Get embeddings
embeddings = results.as_numpy("embeddings")
print(f"Document embeddings shape: {embeddings.shape}")
print(f"Number of embeddings: {embeddings.shape[0]}")

# Verify normalized embeddings
for i in range(embeddings.shape[0]):
    norm = np.linalg.norm(embeddings[i])
    print(f"Document {i + 1} norm: {norm:.6f}")  # Should be ~1.0
