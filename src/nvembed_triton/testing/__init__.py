"""For tests, benchmarks and a first try without the real weights: a tiny random NV-Embed-v2 in
the published layout (tiny_checkpoint). May import every other layer; none imports it."""
