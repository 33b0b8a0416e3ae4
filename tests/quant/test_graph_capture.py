"""qat.prepare captures the forward as a graph and quantizes what the model writes inline."""

from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import BasicBlock, VisionTransformer, resnet_basic

import qat
from qat.quant.graph_capture import CaptureError
from qat.quant.layers import QAct, QAdd, QCat, QConv2d, QConvBn2d, QLinear, QMatMul
from qat.quant.layers.functional import FunctionalOp


def _prepared(model: nn.Module, x, recipe=None, **kwargs) -> nn.Module:
    return qat.prepare(model, recipe, example_inputs=x, **kwargs)


def test_a_torchvision_basic_block_is_fused_and_its_inline_add_quantized() -> None:
    block = BasicBlock(4, 4)
    q = _prepared(block, torch.randn(2, 4, 6, 6))
    assert q.qat_capture == {"mode": "graph"}
    # conv1 → bn1 → the shared ReLU, and conv2 → bn2, fused; `out += identity` → relu: one
    # QAdd with the ReLU, although the block calls one ReLU module twice.
    assert isinstance(q.conv1, QConvBn2d) and q.conv1.relu
    assert isinstance(q.conv2, QConvBn2d) and not q.conv2.relu
    assert isinstance(q.bn1, nn.Identity) and isinstance(q.bn2, nn.Identity)
    assert isinstance(q.add, QAdd) and q.add.relu
    assert "out += identity" not in q.qat_graph_code
    assert "self.add(" in q.qat_graph_code


def test_the_prepared_model_keeps_its_class_tree_and_names() -> None:
    torch.manual_seed(0)
    model = resnet_basic()
    x = torch.randn(2, 3, 16, 16)
    q = _prepared(model, x)
    assert isinstance(q, type(model)) and type(q).__name__ == type(model).__name__
    assert isinstance(q.layer1, nn.Sequential) and isinstance(q.layer1[0].add, QAdd)
    weights = {
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)
    }
    assert weights <= set(q.state_dict())  # conv / fc weights under the same names
    qat.calibrate(q, [x])
    twin = copy.deepcopy(q)
    with torch.no_grad():
        assert torch.equal(twin.eval()(x), q.eval()(x))
    assert twin.qat_graph_code == q.qat_graph_code


def test_the_float_forward_is_unchanged_before_calibration() -> None:
    torch.manual_seed(0)
    model = VisionTransformer().eval()
    x = torch.randn(2, 3, 16, 16)
    q = _prepared(model, x).eval()  # quantizers pass through until they saw data
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), atol=1e-5)


class _Ops(nn.Module):
    """One of each inline op the capture handles."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)
        self.ident = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.conv(x))
        h = F.hardswish(h) + torch.sigmoid(h) * F.hardsigmoid(h)
        h = F.max_pool2d(F.hardtanh(h), 2)
        h = torch.cat([h, F.silu(h)], dim=1)[:, :8]
        t = self.norm(h.permute(0, 2, 3, 1)).reshape(h.shape[0], -1, 8)
        t = F.gelu(self.lin(self.drop(self.ident(t))))
        a = torch.softmax(t @ t.transpose(1, 2), dim=-1)
        t = torch.bmm(a, t) + F.scaled_dot_product_attention(t, t, t)
        return F.adaptive_avg_pool2d(t.view(t.shape[0], 1, -1, 8), 1).flatten(1) + t.mean()


def test_every_inline_op_becomes_an_integer_layer_or_a_float_island() -> None:
    q = _prepared(_Ops(), torch.randn(2, 3, 8, 8))
    kinds = {}
    for name, mod in q.named_modules():
        if isinstance(mod, QAct) and isinstance(mod.act, FunctionalOp):
            kinds.setdefault("island", set()).add(mod.act.op_name)
        elif isinstance(mod, QAdd | QCat | QMatMul | QConv2d | QLinear):
            kinds.setdefault(type(mod).__name__, set()).add(name)
    islands = kinds["island"]
    for op in ("relu6", "hardswish", "sigmoid", "hardsigmoid", "hardtanh", "silu", "gelu"):
        assert op in islands, islands
    assert {"softmax", "scaled_dot_product_attention", "adaptive_avg_pool2d", "mean"} <= islands
    assert "mul" in islands  # sigmoid(h) * hardsigmoid(h): a float product of two activations
    assert len(kinds["QAdd"]) == 3 and len(kinds["QCat"]) == 1 and len(kinds["QMatMul"]) == 2
    assert isinstance(q.norm, QAct) and isinstance(q.norm.act, nn.LayerNorm)
    # Grid-preserving ops stay as they are: no quantizer after permute / reshape / max-pool.
    assert not {"permute", "reshape", "max_pool2d", "getitem", "flatten", "view"} & islands
    assert isinstance(q.drop, nn.Dropout) and isinstance(q.ident, nn.Identity)
    x = torch.randn(4, 3, 8, 8)
    qat.calibrate(q, [x])
    with torch.no_grad():
        assert torch.isfinite(q.eval()(x)).all()


class _TokensAndMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 5, 8))
        self.fc = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0):
        h = self.embed(ids)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return self.fc(h * scale).mean(1)


def test_integer_inputs_keyword_arguments_and_parameters_feeding_integer_ops() -> None:
    ids = torch.randint(0, 16, (2, 4))
    mask = torch.ones(2, 5)
    model = _TokensAndMask()
    q = _prepared(model, {"ids": ids, "mask": mask})
    assert not hasattr(q, "input_quant")  # token ids are not quantized
    # The class token and the position embedding are parameters: requantized before the
    # concat and the add, which are integer ops.
    requants = [
        n for n, m in q.named_modules() if isinstance(m, QAct) and isinstance(m.act, nn.Identity)
    ]
    assert len(requants) >= 2, requants
    qat.calibrate(q, [{"ids": ids, "mask": mask}])
    with torch.no_grad():
        out = q.eval()(ids=ids, mask=mask)
        assert out.shape == (2, 3)
        assert torch.isfinite(out).all()


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.mean() > 0:  # data-dependent control flow: not traceable
            h = -h
        return self.b(h)


def test_data_dependent_control_flow_falls_back_to_the_module_swap_naming_the_line() -> None:
    with pytest.warns(UserWarning, match=r"test_graph_capture\.py:\d+: if h\.mean\(\) > 0"):
        q = qat.prepare(_DataDependent(), example_inputs=torch.randn(1, 1, 4, 4))
    assert q.qat_capture["mode"] == "modules"
    assert "if h.mean() > 0" in q.qat_capture["where"]
    assert isinstance(q.a, QConv2d) and isinstance(q.b, QConv2d)
    with pytest.raises(CaptureError, match="control flow"):
        qat.prepare(_DataDependent(), capture="graph")


def test_capture_modules_is_the_module_swap() -> None:
    block = BasicBlock(4, 4)
    q = qat.prepare(block, capture="modules")
    assert q.qat_capture == {"mode": "modules"}
    assert not hasattr(q, "add")  # the inline += is invisible to a module swap
    with pytest.raises(ValueError, match="capture='everything' is invalid"):
        qat.prepare(block, capture="everything")


def test_places_name_the_first_and_last_layer_in_execution_order() -> None:
    recipe = {
        "weight": {"bits": 4},
        "activation": {"bits": 4},
        "overrides": [
            {"pattern": "@first", "weight": {"bits": 8}},
            {"pattern": "@last", "weight": {"bits": 8}, "activation": {"bits": 32}},
        ],
    }
    q = _prepared(resnet_basic(), torch.randn(2, 3, 16, 16), recipe)
    assert q.conv1.weight_quant.bits == 8 and q.fc.weight_quant.bits == 8
    assert not q.fc.output_quant.enabled
    assert q.layer1[0].conv1.weight_quant.bits == 4
    with pytest.raises(ValueError, match=r"'@fist' matches no quantizable layer.*@first, @last"):
        _prepared(resnet_basic(), torch.randn(2, 3, 16, 16), {"overrides": [{"pattern": "@fist"}]})


def test_new_modules_are_named_after_the_module_that_wrote_the_op() -> None:
    q = _prepared(resnet_basic(), torch.randn(2, 3, 16, 16))
    names = {n for n, m in q.named_modules() if isinstance(m, QAdd)}
    assert names == {"layer1.0.add", "layer1.1.add", "layer2.0.add", "layer2.1.add"}
    recipe = {"overrides": [{"pattern": "layer2.*.add", "activation": {"bits": 4}}]}
    q = _prepared(resnet_basic(), torch.randn(2, 3, 16, 16), recipe)
    assert q.layer2[0].add.output_quant.bits == 4 and q.layer1[0].add.output_quant.bits == 8


def test_a_weightless_module_that_branches_on_training_stays_a_live_module() -> None:
    class DropPath(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                return x
            return x * torch.zeros_like(x)  # drops everything in training: easy to see

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.drop = DropPath()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + self.drop(self.conv(x))

    q = _prepared(Net(), torch.randn(1, 1, 4, 4))
    assert "self.drop" in q.qat_graph_code
    x = torch.randn(2, 1, 4, 4)
    qat.calibrate(q, [x])
    with torch.no_grad():
        assert not torch.equal(q.train()(x), q.eval()(x))


def test_the_add_function_table_covers_inline_forms() -> None:
    from qat.quant.graph_ops import ADD_FUNCTIONS

    assert operator.add in ADD_FUNCTIONS and operator.iadd in ADD_FUNCTIONS
    assert torch.add in ADD_FUNCTIONS


def test_prepare_of_a_graph_model_without_example_inputs_still_captures() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        q = qat.prepare(resnet_basic())
    assert q.qat_capture == {"mode": "graph"}
    assert isinstance(q.layer1[0].add, QAdd)


class _BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d, as timm writes it: BN then ``drop`` and ``act``, a checked input."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected 4D input")
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.momentum,
            self.eps,
        )
        return self.act(self.drop(x))


class _ConvBnAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = _BatchNormAct(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("with_example", [True, False])
def test_norm_act_modules_fold_into_the_conv_and_asserts_stay_checks(with_example: bool) -> None:
    model = _ConvBnAct().eval()
    x = torch.randn(2, 3, 8, 8)
    q = qat.prepare(model, example_inputs=x if with_example else None, capture="graph")
    assert isinstance(q.conv, QConvBn2d) and q.conv.relu  # BN and its ReLU folded
    islands = [m.target for m in q.modules() if isinstance(m, FunctionalOp)]
    assert F.batch_norm not in islands and torch._assert not in islands, islands
    qat.calibrate(q, [x])
    with torch.no_grad():
        assert torch.allclose(q.eval()(x), model(x), atol=0.1)


class _ShapeBranch(nn.Module):
    """Branches on shapes (as timm's position-embedding resampling does) and on data."""

    def __init__(self, data_branch: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.data_branch = data_branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        _, _, height, width = h.shape
        if height * width != 16:  # shape-dependent: fixed by the example
            h = F.interpolate(h, size=(4, 4))
        if self.data_branch and h.sum().item() > 0:  # data-dependent: never baked
            h = -h
        return h.flatten(1)


def test_branches_on_shapes_follow_the_example_branches_on_data_fall_back() -> None:
    x = torch.randn(2, 1, 8, 8)
    q = qat.prepare(_ShapeBranch(False), example_inputs=x, capture="graph")
    assert q.qat_capture["mode"] == "graph"
    assert any("height * width != 16" in w for w in q.qat_capture["specialized"])
    assert q.eval()(x).shape == (2, 32)
    with pytest.warns(UserWarning, match=r"h\.sum\(\)\.item\(\) > 0"):
        q = qat.prepare(_ShapeBranch(True), example_inputs=x)
    assert q.qat_capture["mode"] == "modules"


class _SharedConv(nn.Module):
    """One conv called on two differently quantized tensors (CoaT's shared ``cpe`` conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        a = self.proj(h)
        b = self.proj(F.gelu(h) * 3.0)  # another grid
        return self.fc((a + b).mean((2, 3)))


def test_a_module_called_on_two_grids_gets_a_layer_per_call_sharing_its_weights(
    tmp_path,
) -> None:
    from qat.export import export_model, verify_artifacts

    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    q = _prepared(_SharedConv().eval(), x)
    assert isinstance(q.proj, QConv2d) and isinstance(q.proj_1, QConv2d)
    assert q.proj_1.weight is q.proj.weight and q.proj_1.bias is q.proj.bias
    assert q.proj_1.weight_quant is q.proj.weight_quant
    assert q.proj_1.output_quant is not q.proj.output_quant
    assert sum(p is q.proj.weight for p in q.parameters()) == 1  # trained once
    qat.calibrate(q, [x])
    q.eval()
    qat.snap_bias(q, x)
    # The shared bias fits one call's int32 grid only: it stays, and each call rounds it to
    # its own grid (as the exporter writes it). Snapped for one call, the other call's bias
    # was off its grid: CoaT's ONNX file disagreed on 0.2% of a conv's outputs.
    assert torch.equal(q.proj.runtime_bias, q.proj.bias.detach())
    assert torch.equal(q.proj_1.runtime_bias, q.proj.bias.detach())
    paths = export_model(q, tmp_path, x[:1])  # refused before: one layer, two input grids
    report = verify_artifacts(q, paths, [x])
    assert all(r["agreement"] == 1.0 for r in report["runtimes"].values()), report["runtimes"]
    assert report["runtimes"]["onnx"]["max_abs_diff"] == 0.0, report["runtimes"]


class _FourierPos(nn.Module):
    """A positional encoding computed from the input's shape alone (EdgeNeXt, CSATv2's stem
    statistics): ``x / 10000 ** (2i / d)`` spans four decades."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        b, c, height, width = h.shape
        steps = (~torch.zeros((b, height, width), dtype=torch.bool)).cumsum(2, dtype=torch.float32)
        dim_t = 10000.0 ** (torch.arange(c, dtype=torch.float32) / c)
        pos = (steps[..., None] / dim_t).sin().permute(0, 3, 1, 2)
        return self.fc((h + self.proj(pos)).mean((2, 3)))


def test_values_computed_from_constants_stay_float_and_are_quantized_where_read(
    tmp_path,
) -> None:
    from qat.export import export_model, verify_artifacts

    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    q = _prepared(_FourierPos().eval(), x)
    islands = {m.target for m in q.modules() if isinstance(m, FunctionalOp)}
    assert operator.truediv not in islands and operator.pow not in islands, islands
    qat.calibrate(q, [x])  # raised NonFiniteError: dim_t's small values on an 8-bit grid were 0
    q.eval()
    assert torch.isfinite(q(x)).all()
    qat.snap_bias(q, x)
    report = verify_artifacts(q, export_model(q, tmp_path, x[:1]), [x])
    assert all(r["agreement"] == 1.0 for r in report["runtimes"].values()), report["runtimes"]


class _Float32Attention(nn.Module):
    """timm's EfficientViT (MIT) attention: a branch on the device type, an autocast block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.conv(x)
        if not torch.jit.is_scripting() and v.device.type != "meta":
            with torch.autocast(device_type=v.device.type, enabled=False):
                out = v.float() * 2.0
        else:
            out = v
        return out.mean((2, 3))


def test_device_type_branches_and_autocast_blocks_are_captured() -> None:
    x = torch.randn(2, 3, 4, 4)
    model = _Float32Attention().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the module swap
        q = qat.prepare(model, example_inputs=x, capture="graph")
    assert q.qat_capture["mode"] == "graph"
    assert any("v.device.type" in w for w in q.qat_capture["specialized"])
    assert torch.autocast is not None and torch.autocast.__name__ == "autocast"  # restored
    qat.calibrate(q, [x])
    with torch.no_grad():
        assert torch.allclose(q.eval()(x), model(x), atol=0.1)
