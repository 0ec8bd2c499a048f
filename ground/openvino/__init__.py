"""OpenVINO on the ground: export of torch models to IR, and the runtime (compile in f32, softmax,
parity against torch, latency per tile)."""
