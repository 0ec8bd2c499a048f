"""The networks: students (TinyUNet), the registry that names students and smp models, checkpoints
that rebuild themselves (pruned or not), and the one size counter (parameters, MACs)."""
