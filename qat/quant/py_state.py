"""Mode flags kept as Python attributes but saved in the ``state_dict`` as 0-dim tensors.

The forward pass of a fake-quant layer branches on its bit width and mode flags. Read from
tensor buffers, every such branch is a ``.item()`` that ``torch.compile`` cannot trace (a graph
break per quantizer) and a small tensor op per call in eager mode. :class:`PyStateDict` keeps
them as plain Python attributes, which Dynamo specializes on (a changed flag recompiles once),
and writes them into the ``state_dict`` under the keys and dtypes the buffers had, so
checkpoints saved before and after load both ways, ``strict=True`` included.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch


class PyStateDict:
    """Mixin for an ``nn.Module``: the attributes named in ``PY_STATE`` join its state_dict.

    ``PY_STATE`` holds ``(state_dict key, attribute, dtype)`` triples: an ``int64`` entry is
    read back as ``int``, any other as ``bool``. The keys come after the module's parameters and
    before its buffers, where the buffers they replace were.
    """

    PY_STATE: tuple[tuple[str, str, torch.dtype], ...] = ()

    def _py_state_device(self) -> torch.device:
        for t in (*self._buffers.values(), *self._parameters.values()):  # type: ignore[attr-defined]
            if t is not None:
                return t.device
        return torch.device("cpu")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        own: OrderedDict[str, Any] = OrderedDict()
        super()._save_to_state_dict(own, prefix, keep_vars)  # type: ignore[misc]
        n_params = sum(p is not None for p in self._parameters.values())  # type: ignore[attr-defined]
        items = list(own.items())
        destination.update(items[:n_params])
        device = self._py_state_device()
        for key, attr, dtype in self.PY_STATE:
            value = int(getattr(self, attr))
            destination[prefix + key] = torch.tensor(value, dtype=dtype, device=device)
        destination.update(items[n_params:])

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for key, attr, dtype in self.PY_STATE:
            full = prefix + key
            if full in unexpected_keys:
                unexpected_keys.remove(full)
            if full not in state_dict:
                if strict:
                    missing_keys.append(full)
                continue
            value = state_dict[full]
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
                error_msgs.append(f"size mismatch for {full}: expected a scalar, got {shape}.")
                continue
            value = int(value.reshape(()).item())
            setattr(self, attr, value if dtype == torch.int64 else bool(value))
