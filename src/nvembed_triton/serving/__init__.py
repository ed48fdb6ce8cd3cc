"""Triton: the model repository (one model: a thin model.py adapter), the model's lanes, held
requests, deadlines and metrics, the launcher (serve: serve.sh), the tritonserver process (server),
its supervisor (restarts, drain), memory and shared-memory housekeeping. Imports the protocol, engine
and clients layers (the launcher starts the OpenAI front)."""
