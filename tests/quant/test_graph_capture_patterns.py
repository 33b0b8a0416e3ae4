"""Capture of Python patterns timm's model code writes (each a tiny module reproducing one)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat.export.convert import convert
from qat.export.lowering import placement
from qat.quant.control import set_fake_quant


def _exports_with_full_agreement(q: nn.Module, x: torch.Tensor, tmp_path: Path) -> dict:
    """``q`` (calibrated, in eval mode) exported to every target and verified on ``x``: each
    runtime agrees with it on every input. Returns the verify report."""
    from qat.export import export_model, verify_artifacts

    report = verify_artifacts(q, export_model(q, tmp_path, x[:1]), [x])
    assert all(r["agreement"] == 1.0 for r in report["runtimes"].values()), report["runtimes"]
    return report


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` captured as a graph (no module-swap fallback), calibrated on ``x``, in eval."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the module swap
        q = qat.prepare(model.eval(), example_inputs=x, capture="graph")
    qat.calibrate(q, [x])
    return q.eval()


class _StarShape(nn.Module):
    """``y.reshape(*y.shape[:2], -1)``: Python asks the length of the shape it unpacks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.reshape(*y.shape[:2], -1).mean(-1))


def test_unpacking_a_shape_into_arguments_is_captured() -> None:
    x = torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the module swap
        q = qat.prepare(_StarShape().eval(), example_inputs=x, capture="graph")
    assert q.qat_capture["mode"] == "graph"
    # The line that was specialized is the model's own (not the caller's).
    assert q.qat_capture["specialized"] == [
        next(w for w in q.qat_capture["specialized"] if "reshape(*y.shape[:2], -1)" in w)
    ]
    assert q.eval()(x).shape == (2, 2)


class _SqrtGrid(nn.Module):
    """Nest's ``grid_size = int(math.sqrt(T))`` of a token count, then a reshape to it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.fc(x.flatten(2).transpose(1, 2))  # (B, T, C)
        side = int(math.sqrt(t.shape[1]))
        return t.transpose(1, 2).reshape(t.shape[0], -1, side, side).mean((2, 3))


def test_int_of_a_shape_computation_is_captured() -> None:
    x = torch.randn(2, 4, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the module swap
        q = qat.prepare(_SqrtGrid().eval(), example_inputs=x, capture="graph")
    assert any("int(math.sqrt(t.shape[1]))" in w for w in q.qat_capture["specialized"])
    qat.calibrate(q, [x])
    assert q.eval()(x).shape == (2, 4)


class _LinearAttention(nn.Module):
    """EfficientViT (MIT)'s ReLU linear attention: ``out[..., :-1] / (out[..., -1:] + eps)``,
    whose normalizer is 0 wherever the ReLU kernel zeroes a query."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(3, 12, 1)
        self.proj = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, 4, h * w).transpose(-1, -2).unbind(1)
        q, k = q.relu(), k.relu()
        v = F.pad(v, (0, 1), mode="constant", value=1.0)
        # Its float32 block: casts of tensors that are quint8 in the integer TorchScript model.
        out = q.float() @ (k.float().transpose(-1, -2) @ v.float())
        out = out[..., :-1] / (out[..., -1:] + 1e-15)
        out = out.to(v.dtype)
        return self.proj(out.transpose(-1, -2).reshape(b, 4, h, w)).mean((2, 3))


def test_a_divisor_stays_float_so_a_zero_normalizer_stays_finite(tmp_path) -> None:
    torch.manual_seed(0)
    model = _LinearAttention().eval()
    with torch.no_grad():
        model.qkv.bias[:4] = -10.0  # most queries ReLU to 0: 0 / (0 + eps) = 0 in float
    x = torch.randn(8, 3, 4, 4)
    q = qat.prepare(model, example_inputs=x, capture="graph")
    divisor = next(m for n, m in q.named_modules() if n.endswith(".add") or n == "add")
    assert not divisor.output_quant.enabled  # on a grid, eps rounds to 0: 0 / 0 = NaN
    qat.calibrate(q, [x])
    q.eval()
    assert torch.isfinite(q(x)).all()
    _exports_with_full_agreement(q, x, tmp_path)


class _SliceWrite(nn.Module):
    """MViTv2's relative positions: ``attn[:, :, 1:, 1:] = attn[:, :, 1:, 1:] + rel``."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = nn.Linear(4, 8)
        self.rel = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.flatten(2).transpose(1, 2)  # (B, T, C)
        q, k = self.qk(t).chunk(2, dim=-1)
        attn = q @ k.transpose(1, 2)
        attn[:, 1:, 1:] = attn[:, 1:, 1:] + self.rel(t[:, 1:]).mean(-1, keepdim=True)
        return self.fc(attn.softmax(-1) @ t).mean(1)


def test_a_slice_assignment_is_captured_and_exports(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the module swap
        q = qat.prepare(_SliceWrite().eval(), example_inputs=x, capture="graph")
    assert "setitem" in q.qat_graph_code
    qat.calibrate(q, [x])
    q.train()(x).sum().backward()  # the write is in place on a quantized tensor: trains
    q.eval()
    _exports_with_full_agreement(q, x, tmp_path)


class _SharedMlp(nn.Module):
    """CoaT's ``self.mlp2 = self.mlp3 = Mlp(...)``: one module (a weightless GELU inside)
    called on two branches with their own ranges."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 4)
        self.act = nn.GELU()
        self.fc2 = self.fc  # one module under two names, as CoaT writes it
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        a = self.act(self.fc(t))
        b = self.act(self.fc2(t * 4.0))  # another grid
        return self.head(a + b).mean(1)


def test_a_weightless_module_called_twice_gets_an_island_per_call(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 3, 3)
    q = qat.prepare(_SharedMlp().eval(), example_inputs=x, capture="graph")
    assert q.act is not q.act_1 and q.act.output_quant is not q.act_1.output_quant
    qat.calibrate(q, [x])
    q.eval()
    # Refused before: "layer act is called several times on different input grids".
    _exports_with_full_agreement(q, x, tmp_path)


class _ShiftedWindows(nn.Module):
    """Swin's shifted windows: ``torch.roll`` of an activation (no quantized kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.proj = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.roll(self.conv(x), shifts=(1, -1), dims=(2, 3))
        return self.proj(h.roll(1, 2)).mean((2, 3))


def test_a_rolled_activation_exports_on_its_grid(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    q = _calibrated(_ShiftedWindows(), x)
    report = _exports_with_full_agreement(q, x, tmp_path)
    assert report["runtimes"]["torchscript"]["max_abs_diff"] == 0.0  # refused roll before


class _MaxPoolSame(nn.Module):
    """timm's ``MaxPool2dSame``: ``F.pad(x, pad, value=-inf)`` then ``F.max_pool2d``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.proj = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.pad(self.conv(x), (0, 1, 0, 1), value=-float("inf"))
        return self.proj(F.max_pool2d(h, 2)).mean((2, 3))


def test_a_minus_inf_padding_before_a_max_pool_stays_float(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    q = qat.prepare(_MaxPoolSame().eval(), example_inputs=x, capture="graph")
    qat.calibrate(q, [x])  # raised NonFiniteError: -inf on the pad's grid
    q.eval()
    assert torch.isfinite(q(x)).all()
    _exports_with_full_agreement(q, x, tmp_path)


class _ScaledStdConv(nn.Conv2d):
    """timm's ``ScaledStdConv2d``: the weight is standardized per output channel (a batch
    norm over it) and scaled by a learned gain in ``forward``, before ``F.conv2d``."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__(cin, cout, k, stride=stride, padding=k // 2)
        self.gain = nn.Parameter(torch.full((cout, 1, 1, 1), 1.5))
        self.scale = (cin * k * k) ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=(self.gain * self.scale).view(-1),
            training=True,
            momentum=0.0,
            eps=1e-6,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _StdConvSame(nn.Conv2d):
    """timm's ``StdConv2dSame``: TF "same" padding (``F.pad``) and a standardized weight,
    both in its forward."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__(cin, cout, k, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, self.kernel_size[1] - 1, 0, self.kernel_size[0] - 1))
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _NormFreeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _ScaledStdConv(3, 8, 3, stride=2)
        self.conv = _StdConvSame(8, 8, 2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.stem(x))
        return self.fc((y + F.gelu(self.conv(y))).mean((2, 3)))


def test_a_weight_standardized_conv_runs_on_integer_kernels(tmp_path) -> None:
    torch.manual_seed(0)
    model = _NormFreeNet().eval()
    x = torch.randn(16, 3, 8, 8)
    expected = model(x)
    q = qat.prepare(model, example_inputs=x, capture="graph")
    stem = q.get_submodule("stem")
    assert isinstance(stem, qat.quant.layers.QComputedConv2d)
    # The raw parameters, under their own names, trained through the standardization.
    assert {"stem.weight", "stem.gain", "stem.bias"} <= set(dict(q.named_parameters()))
    assert torch.equal(stem.weight, model.stem.weight)
    assert "batch_norm" not in q.qat_graph_code  # the weight's computation is the layer's own
    assert isinstance(q.get_submodule("conv"), qat.quant.layers.QComputedConv2d)
    q.train()(x).sum().backward()
    assert stem.weight.grad is not None and stem.gain.grad is not None
    set_fake_quant(q, False)
    torch.testing.assert_close(q.eval()(x), expected)  # the float forward, unchanged
    set_fake_quant(q, True)
    qat.calibrate(q, [x])
    q.eval()
    report = _exports_with_full_agreement(q, x, tmp_path)
    # The files store the standardized weight's levels: the logits match to within the one
    # output level a float bias's rounding may move (not only the top-1; the raw weight's
    # levels were 118 levels off here).
    worst = max(r["max_abs_diff"] for r in report["runtimes"].values())
    assert worst <= 1.5 * report["output_scale"], report
    lowered = placement(convert(q, x[:1]), "onnx")
    assert lowered["stem"] == lowered["conv"] == "conv", lowered


class _RowLSTM(nn.Module):
    """Sequencer's ``v, _ = self.rnn_v(v)``: an LSTM over rows, whose output is a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.rnn = nn.LSTM(4, 3, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        rows = self.proj(x.permute(0, 2, 3, 1)).reshape(b * h, w, c)
        out, _ = self.rnn(rows)
        return self.fc(out.reshape(b, h * w, -1)).mean(1)


def test_a_module_returning_a_tuple_runs_as_a_float_island(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3)
    q = _calibrated(_RowLSTM(), x)
    rnn = q.get_submodule("rnn")
    assert isinstance(rnn, qat.quant.layers.QAct) and not rnn.output_quant.enabled
    _exports_with_full_agreement(q, x, tmp_path)  # TorchScript's LSTM reads a float input


class _FoldBack(nn.Module):
    """VOLO's outlook attention: ``F.unfold`` patches, then ``F.fold`` back to an image size
    taken from the input's shape (ONNX ``Col2Im``, opset 18)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        h, w = y.shape[2:]
        patches = F.unfold(y, 3, padding=1) * 0.5
        y = F.fold(patches, output_size=(h, w), kernel_size=3, padding=1)
        return self.fc(y.mean((2, 3)))


def test_fold_exports_at_the_opset_it_needs(tmp_path) -> None:
    import onnx

    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5)
    q = _calibrated(_FoldBack(), x)
    _exports_with_full_agreement(q, x, tmp_path)
    (path,) = tmp_path.glob("*.onnx")
    proto = onnx.load(path)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}
    assert "Col2Im" in {n.op_type for n in proto.graph.node}


class _PositionBiasMLP(nn.Module):
    """SwinV2's continuous position bias: an MLP (Linear → ReLU → Linear) of a constant
    coordinate table, then ``16 * sigmoid(...)`` added to the attention logits."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = nn.Linear(4, 8)
        self.register_buffer("coords", torch.linspace(-1, 1, 18).reshape(9, 2))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.flatten(2).transpose(1, 2)  # (B, 9, 4)
        q, k = self.qk(t).chunk(2, dim=-1)
        bias = 16 * torch.sigmoid(self.cpb_mlp(self.coords))  # (9, 1): the same for every input
        attn = (q @ k.transpose(1, 2) + bias.view(1, 9, 1)).softmax(-1)
        return self.fc(attn @ t).mean(1)


def test_a_layer_of_constants_alone_stays_float(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3)
    q = _calibrated(_PositionBiasMLP(), x)
    assert type(q.get_submodule("cpb_mlp.0")) is nn.Linear  # not fused with its ReLU either
    assert type(q.get_submodule("cpb_mlp.2")) is nn.Linear
    _exports_with_full_agreement(q, x, tmp_path)  # TorchScript: float MLP on float constants
