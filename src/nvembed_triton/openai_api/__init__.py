"""The OpenAI/NIM-compatible HTTP API (app), run by serve.sh in a process of its own: request and
response models (schemas), bounded request bodies (bodies). Calls the server through the client."""
