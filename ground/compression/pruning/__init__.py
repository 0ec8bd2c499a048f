"""Structured (channel) pruning with torch-pruning: criteria (one registry), what is protected
(the output head), and the plan that meets a size target.

    result = prune_to_target(model, example, "lamp", target=0.4, by="params", round_to=8)
    result.model            # a smaller nn.Module of the same class (channels removed, not masked)
"""
