"""Bulk embedding of a corpus into Parquet, resumable: the command (cli), the run itself (embedder),
reading inputs and writing shards atomically (files, pyarrow), the same step as a Ray Data transform
(ray_transform). Calls the server through the client."""
