"""PyTorch's ``x86`` quantized engine, bit for bit, as it behaves on the machine at hand: which
kernels it runs convs on, how they round, what the export verifies under, and whole exported
models held to the fake-quant numerics of the engine they load under.

Where the CPU has AVX-512 VNNI (on Linux), ``x86`` runs convs of at most
:data:`~qat.quant.numerics.ONEDNN_MAX_GROUPS` groups on oneDNN (:func:`onednn_levels`); on
other CPUs (AVX2, the CI's class) it runs every conv on fbgemm (:func:`_fbgemm`). The tests ask
the kernel which one this machine has and check that branch, and that the other one's rounding
would have given other outputs on the same cases, so both machine classes run a real check.

The kernel cases are built around rounding ties: each channel's multiplier ``s_in · s_w / s_out``
sits within 2e-7 of 1/2, 1/4, 3/2, 1/8 or 3/4 and the bias within 2e-7 of a half level, so that
many outputs land next to a rounding boundary, where fbgemm and oneDNN disagree.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from export_helpers import Wrap, quantize, recipe
from torch import nn

from qat import runtime_numerics, snap_bias
from qat.export import check_parity, export_model, verify_artifacts
from qat.export.torchscript import load_torchscript, numerics_target, quantized_engine
from qat.quant.numerics import ONEDNN_MAX_GROUPS, onednn_levels

#: Whether this machine's ``x86`` engine runs convs on oneDNN, as the kernel answers it.
ONEDNN = numerics_target("x86") == "torchscript_x86"


def _cpu_has_avx512_vnni() -> bool:
    """The CPU flag ATen's ``should_use_onednn_quant`` asks for (``cpuinfo_has_x86_avx512vnni``)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return "avx512_vnni" in flags


def _case(c: int, oc: int, groups: int, bits: int, k: int, seed: int) -> dict:
    """Near-tie scales, input codes, weight levels and bias for one conv (or linear: k=0)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    s_in, s_out = (float(rand(1) * 0.05 + 0.002) for _ in range(2))
    m = float(torch.tensor([0.5, 0.25, 1.5, 0.125, 0.75])[seed % 5])
    s_w = s_out * m / s_in * (1 + (rand(oc) - 0.5) * 4e-7)
    qmax = 2 ** (bits - 1) - 1
    shape = (oc, c // groups, k, k) if k else (oc, c)
    levels = torch.randint(-qmax, qmax + 1, shape, generator=g, dtype=torch.int8)
    half_levels = torch.randint(-60, 60, (oc,), generator=g).double()
    bias = (half_levels * s_in * s_w * 0.5 * (1 + (rand(oc) - 0.5) * 4e-7)).float()
    z_in, z_out = (int(torch.randint(0, 60, (1,), generator=g)) for _ in range(2))
    x_shape = (2, c, 8, 8) if k else (16, c)
    x = torch.quantize_per_tensor(rand(*x_shape).float() * s_in * 60, s_in, z_in, torch.quint8)
    return {"s_in": s_in, "s_w": s_w, "s_out": s_out, "z": z_out, "w": levels, "b": bias, "x": x}


def _kernel(t: dict, engine: str, groups: int, stride: int, relu: bool) -> torch.Tensor:
    """The stored u8 output of torch's quantized conv (or linear) under ``engine``."""
    w = torch._make_per_channel_quantized_tensor(
        t["w"], t["s_w"], torch.zeros(len(t["s_w"]), dtype=torch.long), 0
    )
    with warnings.catch_warnings(), quantized_engine(engine):
        warnings.simplefilter("ignore")
        if t["w"].dim() == 2:
            layer = (nniq.LinearReLU if relu else nnq.Linear)(w.shape[1], w.shape[0])
        else:
            cls = nniq.ConvReLU2d if relu else nnq.Conv2d
            k = w.shape[-1]
            layer = cls(w.shape[1] * groups, w.shape[0], k, stride, k // 2, groups=groups)
        layer.set_weight_bias(w, t["b"])
        layer.scale, layer.zero_point = t["s_out"], t["z"]
        return layer(t["x"]).int_repr().float()


def _acc(t: dict, groups: int, stride: int) -> torch.Tensor:
    codes = t["x"].int_repr().double() - t["x"].q_zero_point()
    if t["w"].dim() == 2:
        return codes @ t["w"].double().T
    k = t["w"].shape[-1]
    return F.conv2d(codes, t["w"].double(), None, stride, k // 2, 1, groups)


def _fbgemm(t: dict, acc: torch.Tensor, relu: bool, ch: int = 1) -> torch.Tensor:
    """fbgemm's requantization: round(float32(acc + float32(b / (s_in·s_w))) · M) + z."""
    shape = [1] * acc.dim()
    shape[ch] = -1
    act_w = torch.tensor(t["s_in"], dtype=torch.float32) * t["s_w"].float()
    m = act_w / torch.tensor(t["s_out"], dtype=torch.float32)
    y = acc.float() + (t["b"] / act_w).reshape(shape)
    return (torch.round(y * m.reshape(shape)) + t["z"]).clamp(t["z"] if relu else 0, 255)


def _onednn(t: dict, acc: torch.Tensor, relu: bool, ch: int = 1) -> torch.Tensor:
    shape = [1] * acc.dim()
    shape[ch] = -1
    args = (t["s_in"], t["s_w"], t["s_out"], t["z"], t["b"], shape)
    return (onednn_levels(acc, *args) + t["z"]).clamp(t["z"] if relu else 0, 255)


CONVS = [  # (in channels, out channels, kernel, stride, groups)
    (8, 64, 3, 1, 1),
    (3, 16, 3, 1, 1),
    (32, 64, 3, 2, 1),
    (64, 128, 1, 1, 1),
    (32, 64, 3, 1, 4),
    (32, 32, 3, 1, 32),
    (96, 96, 3, 2, 96),
]


def test_the_x86_engine_here_is_the_one_the_cpu_selects() -> None:
    """The kernel's answer (an exact tie rounded) agrees with the CPU flags ATen dispatches on,
    and names the fake-quant numerics each engine is verified under on this machine."""
    cpu_selects_onednn = sys.platform.startswith("linux") and _cpu_has_avx512_vnni()
    assert cpu_selects_onednn == ONEDNN
    assert numerics_target("x86") == ("torchscript_x86" if ONEDNN else "torchscript")
    assert numerics_target("fbgemm") == "torchscript"  # fbgemm's rounding on every CPU
    with pytest.raises(ValueError, match="qnnpack"):
        numerics_target("qnnpack")


def _rounding_here_and_elsewhere() -> tuple:
    """This machine's x86 conv requantization, and the other machine class's."""
    return (_onednn, _fbgemm) if ONEDNN else (_fbgemm, _onednn)


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: "c{}-oc{}-k{}-s{}-g{}".format(*c))
def test_x86_conv_kernel_rounds_as_the_engine_this_cpu_selects(
    conv: tuple, bits: int, relu: bool
) -> None:
    c, oc, k, stride, groups = conv
    here, elsewhere = _rounding_here_and_elsewhere()
    flips = 0
    for seed in range(3):
        t = _case(c, oc, groups, bits, k, seed)
        acc = _acc(t, groups, stride)
        out = _kernel(t, "x86", groups, stride, relu)
        assert torch.equal(out, here(t, acc, relu)), seed
        flips += int((out != elsewhere(t, acc, relu)).sum())
    if bits == 4:
        assert flips > 0  # the cases reach the ties where the two engines part


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_wide_depthwise_convs_and_linears_stay_on_fbgemm(relu: bool) -> None:
    width = ONEDNN_MAX_GROUPS + 1
    for seed in range(2):
        t = _case(width, width, width, 4, 3, seed)
        acc = _acc(t, width, 1)
        out = _kernel(t, "x86", width, 1, relu)
        assert torch.equal(out, _fbgemm(t, acc, relu))
        assert torch.equal(out, _kernel(t, "fbgemm", width, 1, relu))
        t = _case(64, 10, 1, 4, 0, seed)
        acc = _acc(t, 1, 1)
        out = _kernel(t, "x86", 1, 1, relu)
        assert torch.equal(out, _fbgemm(t, acc, relu, ch=-1))
    # At the limit itself, this machine's conv engine (oneDNN where the CPU has it).
    here, _ = _rounding_here_and_elsewhere()
    t = _case(ONEDNN_MAX_GROUPS, ONEDNN_MAX_GROUPS, ONEDNN_MAX_GROUPS, 4, 3, 0)
    out = _kernel(t, "x86", ONEDNN_MAX_GROUPS, 1, relu)
    assert torch.equal(out, here(t, _acc(t, ONEDNN_MAX_GROUPS, 1), relu))


class _Net(nn.Module):
    """Stem, grouped conv, a depthwise conv on each side of the oneDNN limit, residual add,
    average pool and a linear head: every route the x86 engine takes."""

    def __init__(self) -> None:
        super().__init__()
        wide = ONEDNN_MAX_GROUPS + 4

        def cbr(cin: int, cout: int, groups: int = 1) -> nn.Sequential:
            conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False)
            return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = cbr(3, 32)
        self.grouped = cbr(32, 32, 4)
        self.dw = cbr(32, 32, 32)
        self.expand = nn.Conv2d(32, wide, 1)
        self.dw_wide = cbr(wide, wide, wide)
        self.project = nn.Conv2d(wide, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = self.dw(self.grouped(y)) + y
        y = self.project(self.dw_wide(torch.relu(self.expand(y))))
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _near_tie_scales(q: nn.Module, x: torch.Tensor, m: float = 1 / 64) -> None:
    """Every conv's weight scales set so that its multipliers lie within 2e-7 of ``m``: sums
    ``64k + 32`` then land next to a tie, where the engines part (biases snapped again)."""
    snap_bias(q, x)  # pins each layer's input scale
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in q.modules():
            if isinstance(mod, nn.Conv2d) and getattr(mod, "runtime_input_scale", None):
                s_out = float(mod.output_quant.qparams()[0].reshape(-1)[0])
                scale = mod.weight_quant.scale
                noise = 1 + (torch.rand(scale.shape, generator=g, dtype=torch.float64) - 0.5) * 4e-7
                scale.copy_(s_out * m / mod.runtime_input_scale * noise)
    snap_bias(q, x)


@pytest.mark.parametrize("bits", [8, 4])
def test_exported_layers_equal_the_fake_quant_model_under_each_engine(bits, tmp_path) -> None:
    torch.manual_seed(bits)

    def batch() -> torch.Tensor:
        return torch.randn(32, 3, 8, 8)

    q = quantize(Wrap(_Net()), recipe(bits), batch)
    x = batch()
    _near_tie_scales(q, x[:8])
    path = export_model(q, tmp_path, x[:1], targets=["torchscript"])["torchscript"]
    refs = {}
    for target in ("torchscript", "torchscript_x86"):
        with torch.no_grad(), runtime_numerics(q, target=target):
            refs[target] = q(x)
    # The near-ties are hit: the two machine classes' numerics part on this batch.
    assert not torch.equal(refs["torchscript"], refs["torchscript_x86"])
    outs = {}
    for engine in ("x86", "fbgemm"):
        with torch.no_grad():
            outs[engine] = load_torchscript(path, engine=engine)(x)
        assert torch.equal(outs[engine], refs[numerics_target(engine)]), engine
    # Without oneDNN the default engine computes what fbgemm does, to the bit.
    assert torch.equal(outs["x86"], outs["fbgemm"]) == (not ONEDNN)


def test_small_cnn_verifies_exactly_under_x86(tmp_path) -> None:
    """The export's own verification (``x86``, the default engine): 100% top-1 agreement and
    logits identical to the fake-quant model's on 256 images."""
    torch.manual_seed(0)

    def batch() -> torch.Tensor:
        return torch.randn(64, 3, 8, 8)

    q = quantize(
        Wrap(_Net()), recipe(4, overrides=[{"pattern": "@last", "weight": {"bits": 8}}]), batch
    )
    data = [(batch(), torch.randint(0, 10, (64,))) for _ in range(4)]
    snap_bias(q, data[0][0][:8])
    paths = export_model(q, tmp_path, data[0][0][:1])
    # The same file loaded under fbgemm too (a key naming the engine).
    report = verify_artifacts(q, {**paths, "torchscript_fbgemm": paths["torchscript"]}, data)
    check_parity(report, min_agreement=1.0, max_accuracy_drop_pt=0.0)
    for key, engine in (("torchscript", "x86"), ("torchscript_fbgemm", "fbgemm")):
        ts = report["runtimes"][key]
        assert ts["engine"] == engine and ts["numerics"] == numerics_target(engine)
        assert ts["agreement"] == 1.0 and ts["max_abs_diff"] == 0.0, ts
