"""Serve NV-Embed-v2 (and sentence-transformers models) from Triton's Python backend.

Importing this package is cheap: modules that need torch import it themselves.
"""
