"""What autograd keeps for a backward: a measure for the memory claims of handgrad's layers
and networks (the benchmarks, problem 7.11's checkpointing)."""

import torch


def saved_bytes(model, x):
    """Bytes of distinct storage that autograd keeps for the backward of model(x), parameters
    excluded (they are there anyway); and model(x)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        pointer = t.untyped_storage().data_ptr()
        if pointer not in parameters:
            storages[pointer] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(storages.values()), out


__all__ = ["saved_bytes"]
