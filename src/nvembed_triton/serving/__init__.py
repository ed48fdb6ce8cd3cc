"""Triton: the model repository (two thin model.py adapters: the public model and the encoder),
the encoder's lanes, the models' metrics, the launcher (serve: serve.sh), the tritonserver process
(server), its supervisor (restarts, drain), memory and shared-memory housekeeping. Imports the
protocol, engine and clients layers (the launcher starts the OpenAI front)."""
