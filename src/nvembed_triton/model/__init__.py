"""The Triton model: its repository (config.pbtxt and a thin model.py), how a request is read and
answered (request_rules), the lanes that compute passes, held requests and their deadlines,
metrics, the pass log and the request threads' malloc cache. Imports engine, protocol and settings."""
