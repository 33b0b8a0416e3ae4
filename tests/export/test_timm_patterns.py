"""Export of patterns timm's model code writes (each a tiny module reproducing one family's)."""

from __future__ import annotations

import warnings

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat.export import export_model, verify_artifacts
from qat.export.onnx import export_float_onnx
from qat.export.onnx.adaptive_pool import adaptive_avg_pool2d_unrolled


def _export_and_verify(model: nn.Module, x: torch.Tensor, tmp_path) -> dict:
    """prepare (graph capture) → calibrate → export → the verify report on ``x``."""
    torch.manual_seed(0)
    q = qat.prepare(model.eval(), None, example_inputs=x)
    assert q.qat_capture == {"mode": "graph"}
    qat.calibrate(q, [x])
    q.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = export_model(q, tmp_path, x[:1])
    return verify_artifacts(q, paths, [(x, torch.zeros(len(x), dtype=torch.long))])


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


class _ReadsConvWeight(nn.Module):
    """EdgeNeXt's positional encoding: a conv's weight read for its device beside the call."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b, _, h, w = x.shape
        mask = ~torch.zeros((b, h, w), device=self.proj.weight.device, dtype=torch.bool)
        x = self.proj(x * mask.unsqueeze(1)).relu()
        return self.head(x.mean((2, 3)))


def test_a_forward_reading_a_quantized_layers_weight_exports(tmp_path) -> None:
    torch.manual_seed(0)
    report = _export_and_verify(_ReadsConvWeight(), torch.randn(16, 3, 8, 8), tmp_path)
    for name, r in report["runtimes"].items():
        assert r["agreement"] == 1.0, name


@pytest.mark.parametrize("size_in", [(8, 8), (4, 4), (1, 1), (13, 11)])
def test_unrolled_adaptive_pooling_is_bitwise_torchs(size_in: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size_in) * 10
    for layout in (torch.contiguous_format, torch.channels_last):
        x = x.contiguous(memory_format=layout)
        assert torch.equal(
            adaptive_avg_pool2d_unrolled(x, (7, 5)), F.adaptive_avg_pool2d(x, (7, 5))
        )


class _PoolTo7(nn.Module):
    """CSATv2's spatial attention: ``nn.AdaptiveAvgPool2d((7, 7))`` of an 8×8 map (windows
    of unequal size), then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((7, 7))
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.pool(self.stem(x))).mean((2, 3)))


def test_adaptive_pooling_to_a_fixed_grid_exports(tmp_path) -> None:
    torch.manual_seed(0)
    report = _export_and_verify(_PoolTo7(), torch.randn(16, 3, 8, 8), tmp_path)
    for name, r in report["runtimes"].items():
        assert r["agreement"] == 1.0 and r["max_abs_diff"] == 0.0, (name, r)


def test_the_torchscript_add_of_mixed_layouts_rounds_as_the_fake_quant_model() -> None:
    """An island's NCHW output plus a conv's channels-last output (FastViT's stem): on mixed
    layouts ``quantized::add`` runs its scalar loop, which rounds this level pair otherwise."""
    from qat.export.ir import ActGrid, LayerDesc
    from qat.export.torchscript import _IntAdd  # the add alone: one level pair shows it
    from qat.quant.runtime_add import quantized_add_levels

    def grid(scale: float, zero: int) -> ActGrid:
        return ActGrid(scale, zero, 0, 255, 8, False, "test")

    ga, gb, gc = (0.016889065504074097, 126), (0.031396232545375824, 149), (0.0381070673, 124)
    desc = LayerDesc(name="add", kind="add", inputs=(grid(*ga), grid(*gb)), output=grid(*gc))
    a = torch.full((2, 8, 4, 4), 61, dtype=torch.uint8)
    b = torch.full((2, 8, 4, 4), 187, dtype=torch.uint8)
    qa = torch._make_per_tensor_quantized_tensor(a, *ga)
    qb = torch._make_per_tensor_quantized_tensor(b, *gb).contiguous(
        memory_format=torch.channels_last
    )
    expected = quantized_add_levels(a, b, ga, gb, gc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _IntAdd(desc)(qa, qb).int_repr().float()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("kwargs", [{"size": (56, 45)}, {"scale_factor": 1.7}])
def test_a_resize_by_taps_is_torchs_to_an_ulp(mode: str, kwargs: dict) -> None:
    from qat.quant.layers.functional import SLOT, FunctionalOp
    from qat.quant.layers.resize import SeparableResize

    op = FunctionalOp(F.interpolate, (SLOT,), {**kwargs, "mode": mode})
    x = torch.randn(2, 3, 60, 50)
    # ONNX Runtime's own cubic Resize was 1.4e-4 off on a 240 → 224 image of this range.
    torch.testing.assert_close(SeparableResize(op)(x), op(x), rtol=0, atol=2e-6)


class _TwoScales(nn.Module):
    """CrossViT's second branch: the image resized (bicubic) to its own side, then embedded."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 4, 4)
        self.b = nn.Conv2d(3, 8, 4, 4)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]  # a size computed from the input's (MobileViT): traced at export
        small = F.interpolate(x, size=(h - 4, w - 4), mode="bicubic", align_corners=False)
        return self.fc(self.a(x).mean((2, 3)) + self.b(small).mean((2, 3)))


def test_a_bicubic_resize_exports_as_gathers_and_multiplies(tmp_path) -> None:
    import onnx

    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    q = qat.prepare(_TwoScales().eval(), example_inputs=x[:2], capture="graph")
    qat.calibrate(q, [x])
    q.eval()
    qat.snap_bias(q, x)
    report = verify_artifacts(q, export_model(q, tmp_path, x[:1]), [x])
    assert all(r["agreement"] == 1.0 for r in report["runtimes"].values()), report
    (path,) = tmp_path.glob("*.onnx")
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "Resize" not in ops and "Gather" in ops
    # The island's codes are ONNX Runtime's to the bit: the logits too (biases snapped).
    assert max(r["max_abs_diff"] for r in report["runtimes"].values()) == 0.0, report
