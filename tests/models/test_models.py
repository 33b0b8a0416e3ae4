"""The model registry and the structural conventions the quantization module swap relies on."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from qat.models import create_model, list_models, register_model
from qat.models import registry as registry_module
from qat.models.resnet_cifar import CifarResNet
from qat.ops import Add

MODELS = ["lenet5", "mobilenetv2", "resnet18", "resnet20", "resnet32", "resnet56"]
# Residual blocks per model = number of `Add` modules the swap must find.
RESIDUAL_BLOCKS = {
    "resnet20": 9,
    "resnet32": 15,
    "resnet56": 27,
    "resnet18": 8,
    "mobilenetv2": 10,  # width 1.0: stride-1, same-width inverted residuals 1 + 2 + 3 + 2 + 2
    "lenet5": 0,
}
# Narrow variants keep the structural tests fast; the full widths are built in test_default_*.
SMALL = {"resnet18": {"base_width": 8}, "mobilenetv2": {"width_mult": 0.25}}
# (num_classes, in_channels, image_size): CIFAR, Fashion-MNIST, digits 8x8 and 16x16.
SHAPES = [(10, 3, 32), (7, 1, 28), (10, 1, 8), (100, 3, 16)]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread. On this 2-core box, 2 OpenMP threads that spin while
    another process holds a core made a ResNet step 100x slower (2.4 s vs 0.02 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str, **kwargs: object) -> nn.Module:
    return create_model(name, **{**SMALL.get(name, {}), **kwargs})


class _AddLeafTracer(torch.fx.Tracer):
    """Trace through everything except the Add marker (what the swap sees as one unit)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Add) or super().is_leaf_module(m, qualname)


def test_registered_names() -> None:
    # The CNNs here; the transformers (gpt, vit) in test_transformers.py; timm's in
    # test_timm_models.py.
    assert list_models() == sorted([*MODELS, "gpt", "timm", "vit"])
    assert list_models("resnet*") == ["resnet18", "resnet20", "resnet32", "resnet56"]


@pytest.mark.parametrize("name", MODELS)
def test_default_model_forward(name: str) -> None:
    model = create_model(name)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"c{s[0]}-in{s[1]}-{s[2]}px")
@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_backward(name: str, shape: tuple[int, int, int]) -> None:
    num_classes, in_channels, image_size = shape
    model = build(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    x = torch.randn(2, in_channels, image_size, image_size)
    out = model(x)
    assert out.shape == (2, num_classes)
    assert (model.num_classes, model.in_channels, model.image_size) == shape
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, num_classes)


@pytest.mark.parametrize("name", MODELS)
def test_conv_bn_relu_are_adjacent_children_of_a_sequential(name: str) -> None:
    model = build(name)
    bn_in_place = set()
    conv_followed_by_bn = set()
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq.children())
        for i, kid in enumerate(kids):
            if isinstance(kid, nn.BatchNorm2d):
                conv = kids[i - 1] if i > 0 else None
                assert isinstance(conv, nn.Conv2d), f"{name}: BN not right after a conv in {seq}"
                assert conv.bias is None, f"{name}: conv before BN has a bias"
                assert conv.out_channels == kid.num_features
                bn_in_place.add(id(kid))
                conv_followed_by_bn.add(id(conv))
                after = kids[i + 1] if i + 1 < len(kids) else None
                assert after is None or isinstance(after, nn.ReLU), f"{name}: {after} after BN"
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert bns and all(id(bn) in bn_in_place for bn in bns)
    assert all(id(c) in conv_followed_by_bn for c in convs), f"{name}: a conv without BN"
    assert not any(isinstance(m, nn.ReLU6) for m in model.modules())


@pytest.mark.parametrize("name", MODELS)
def test_every_op_is_a_module_and_residuals_use_add(name: str) -> None:
    model = create_model(name)  # default widths: RESIDUAL_BLOCKS counts are for them
    graph = _AddLeafTracer().trace(model)
    # No inline `a + b`, F.relu, torch.flatten, x.mean(...): the swap only sees modules.
    inline = [n.format_node() for n in graph.nodes if n.op in ("call_function", "call_method")]
    assert inline == [], f"{name} computes outside modules: {inline}"
    adds = [m for m in model.modules() if isinstance(m, Add)]
    assert len(adds) == RESIDUAL_BLOCKS[name]
    add_calls = [
        n
        for n in graph.nodes
        if n.op == "call_module" and isinstance(model.get_submodule(str(n.target)), Add)
    ]
    assert len(add_calls) == len(adds)  # each Add used once, with two inputs
    assert all(len(n.args) == 2 for n in add_calls)
    # Basic blocks end in relu(out + identity); inverted residuals add without ReLU.
    expect_relu = name.startswith("resnet")
    assert all(a.relu is expect_relu for a in adds)


@pytest.mark.parametrize("name", MODELS)
def test_first_and_last_layer_names(name: str) -> None:
    model = build(name, num_classes=5, in_channels=1, image_size=28)
    assert model.first_conv_name == "stem.0" and model.classifier_name == "fc"
    first, last = model.get_submodule("stem.0"), model.get_submodule("fc")
    assert isinstance(first, nn.Conv2d) and first.in_channels == 1
    assert isinstance(last, nn.Linear) and last.out_features == 5
    # They really are the first and last layers applied.
    calls = [str(n.target) for n in _AddLeafTracer().trace(model).nodes if n.op == "call_module"]
    weighted = [t for t in calls if isinstance(model.get_submodule(t), nn.Conv2d | nn.Linear)]
    assert weighted[0] == "stem.0" and weighted[-1] == "fc"
    # Global pooling is the module sequence pool → flatten → (dropout) → fc.
    if name != "lenet5":
        assert isinstance(model.get_submodule("pool"), nn.AdaptiveAvgPool2d)
        assert isinstance(model.get_submodule("flatten"), nn.Flatten)


# TorchScript is what the integer exporter targets; its deprecation notice is not news here.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", MODELS)
def test_torchscript_matches_eager(name: str) -> None:
    model = build(name, in_channels=1, image_size=16).eval()
    x = torch.randn(2, 1, 16, 16)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_no_zero_bn_scale() -> None:
    # Folding γ/σ into the weight before quantization needs γ ≠ 0 at the start.
    model = create_model("resnet20")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight != 0)


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'.*available: .*resnet20"):
        create_model("resnet21")


def test_unknown_kwarg_lists_accepted_ones() -> None:
    with pytest.raises(TypeError, match=r"width_mult.*it takes: num_classes, in_channels"):
        create_model("resnet20", width_mult=0.5)


@pytest.mark.parametrize(
    ("name", "kwargs", "argument"),
    [
        ("resnet20", {"num_classes": 0}, "num_classes"),
        ("resnet20", {"in_channels": True}, "in_channels"),
        ("resnet56", {"image_size": 0}, "image_size"),
        ("resnet20", {"base_width": -1}, "base_width"),
        ("resnet18", {"num_classes": 2.5}, "num_classes"),
        ("resnet18", {"base_width": 0}, "base_width"),
        ("mobilenetv2", {"width_mult": 0}, "width_mult"),
        ("mobilenetv2", {"width_mult": "1"}, "width_mult"),
        ("mobilenetv2", {"dropout": 1.0}, "dropout"),
        ("lenet5", {"image_size": 3}, "image_size"),
        ("lenet5", {"in_channels": 0}, "in_channels"),
    ],
)
def test_bad_argument_values(name: str, kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        create_model(name, **kwargs)


def test_cifar_resnet_depth_must_be_6n_plus_2() -> None:
    with pytest.raises(ValueError, match="depth"):
        CifarResNet(depth=21)
    assert sum(isinstance(m, Add) for m in CifarResNet(depth=44).modules()) == 21


def test_width_mult_and_base_width_scale_the_model() -> None:
    def size(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert size(create_model("mobilenetv2", width_mult=0.5)) < size(create_model("mobilenetv2"))
    assert size(create_model("resnet18", base_width=16)) < size(create_model("resnet18"))
    assert 0.26e6 < size(create_model("resnet20")) < 0.28e6  # the paper's 0.27M


def test_register_model() -> None:
    @register_model(name="_test_tiny")
    def tiny(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))

    try:
        assert "_test_tiny" in list_models()
        assert create_model("_test_tiny", num_classes=3)(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
        with pytest.raises(ValueError, match="already registered"):
            register_model(name="_test_tiny")(lambda: nn.Identity())
        register_model(name="_test_tiny")(tiny)  # re-registering the same builder is harmless
    finally:
        registry_module._MODELS.pop("_test_tiny", None)
