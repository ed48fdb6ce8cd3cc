"""Calling a server: the gRPC client (client), the OpenAI/NIM-compatible front (openai_api,
openai_http, openai_schemas), the LangChain adapter, the bulk corpus embedder (corpus,
corpus_files, corpus_ray). The light install: no torch. Imports the protocol layer only."""
