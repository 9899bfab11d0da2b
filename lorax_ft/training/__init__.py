"""Training: optimizers from config or optax, partitioned by label; the pure train step."""
