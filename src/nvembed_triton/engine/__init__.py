"""The models, usable in-process without Triton (torch): tokenisation, checkpoints and their
checks, NV-Embed-v2 itself, the sentence-transformers encoder, token-budget pass planning, the CPU
linear kernels and CUDA graphs. load_encoder (encoders) picks the encoder a model directory holds.
Imports protocol and settings only."""
