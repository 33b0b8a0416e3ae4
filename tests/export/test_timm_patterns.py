"""Export of patterns timm's model code writes (each a tiny module reproducing one family's)."""

from __future__ import annotations

import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from qat.export.onnx import export_float_onnx


class _Attention(nn.Module):
    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        return F.scaled_dot_product_attention(x, x, x, is_causal=is_causal)


class _DefaultFlagModel(nn.Module):
    """timm's Eva: ``forward(x, attn_mask=None, is_causal=False)`` passed down to SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attention()

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        return self.attn(x, is_causal=is_causal)


def test_float_onnx_keeps_python_defaults_of_forward_arguments(tmp_path) -> None:
    model = _DefaultFlagModel().eval()
    x = torch.randn(1, 2, 4, 8)
    path = export_float_onnx(model, tmp_path / "f.onnx", x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]  # the flag is no input
    (got,) = sess.run(None, {"input": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-5, rtol=1e-5)
