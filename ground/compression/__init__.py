"""Compression: structured pruning (ground.compression.pruning) and precision alignment
(ground.compression.fp16)."""
