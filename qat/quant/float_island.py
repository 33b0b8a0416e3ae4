"""Float islands evaluated in float64 and rounded once to float32, in every runtime alike.

Between the integer layers of a transformer, LayerNorm, attention (``q·kᵀ``, softmax, ``·v``)
and GELU compute in float. Two float32 implementations of them (PyTorch's and ONNX Runtime's)
round differently in the last bit, and the next dynamic activation quantizer turns a one-ulp
difference next to a rounding boundary into a whole level, which changes the next token where
the model's top two were close (docs/lm_results.md measures it). Evaluated in float64 and
rounded to float32 at the island's end, each output is the correctly rounded value of the
island's function except within ~1e-16 (relative) of a float32 rounding boundary, whatever the
implementation: the exported graph and the reference then agree.

:func:`float64_call` runs a module that way (its parameters and buffers cast for the call,
not changed); the ONNX language-model exporter emits the islands the same way
(``Cast(double) → ops → Cast(float)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

__all__ = ["float64_call", "to_float64"]


def to_float64(value: Any) -> Any:
    """A float32 tensor as float64; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.double()
    return value


def float64_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``module(*args, **kwargs)`` computed in float64; float64 results rounded to float32."""
    state = {k: to_float64(v) for k, v in module.named_parameters()}
    state.update({k: to_float64(v) for k, v in module.named_buffers()})
    out = functional_call(
        module,
        state,
        tuple(to_float64(a) for a in args),
        {k: to_float64(v) for k, v in kwargs.items()},
    )
    # A tuple too (an LSTM's output and state).
    return tree_map(
        lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.float64 else t,
        out,
    )
