"""How quantized conv / linear layers evaluate: as in training, or as the integer runtimes do.

Training and ordinary evaluation compute each conv / linear in float32 and fake-quantize the
result. Inside :func:`runtime_numerics`, a model's integer layers (in eval mode) instead compute
what the integer kernels compute:

- products are summed exactly (float64 here, int32 in the runtimes). float32 accumulation of
  the same products rounds, and wherever a result lands next to a rounding boundary of the
  output grid the two pick different levels; through a deep 8-bit network those one-level
  flips add up: a ResNet-20 W8A8 disagreed with its exported models on 0.18% of the test
  images in float32 and 0.04% with float64 sums;
- a layer whose input grid :func:`qat.snap_bias` pinned (``runtime_input_scale``) requantizes
  its integer sum with the runtimes' float32 multiplier ``s_in · s_w / s_out``
  (:func:`quantized_output`), or, for target ``"torchscript_x86"``, as oneDNN does
  (:func:`onednn_levels`).

Used for the test metrics and the parity check (about 4x the float32 time); training is
unaffected. The mode is per model, set for the duration of the block on each of its layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qat.quant.bias import INT32_MAX, INT32_MIN, bias_levels, grid_bias
from qat.quant.quantizer import FakeQuantizer
from qat.quant.runtime_add import Grid


class RuntimeNumerics:
    """The evaluation state of an integer conv / linear layer (plain attributes, not saved).

    Mixed into ``QConv2d``, ``QLinear`` and ``QConvBn2d``.
    """

    #: Compute as the integer runtimes do; set for a block by :func:`runtime_numerics`.
    exact_numerics: bool = False
    #: Whose kernels, where the runtimes differ: one of :data:`NUMERICS_TARGETS`.
    numerics_target: str = "onnx"
    #: The input scale the layer's int32 bias was rounded for, pinned by :func:`qat.snap_bias`.
    runtime_input_scale: float | None = None
    #: The float (folded) bias :func:`qat.snap_bias` left, on the int32 grid to within float32
    #: error; while the layer's bias is still this, runtime numerics add its int32 level.
    runtime_bias: torch.Tensor | None = None


#: The runtimes :func:`runtime_numerics` can compute as: ONNX Runtime; PyTorch's quantized
#: kernels as fbgemm computes them (``"torchscript"``: the ``fbgemm`` engine, and ``x86`` on a
#: CPU without AVX-512 VNNI); and as the ``x86`` engine computes them on an AVX-512 VNNI CPU
#: (``"torchscript_x86"``: convs on oneDNN). :func:`qat.export.torchscript.numerics_target`
#: tells which of the last two an engine computes on the machine at hand.
NUMERICS_TARGETS = ("onnx", "torchscript", "torchscript_x86")

#: PyTorch's ``x86`` engine runs a conv on oneDNN (where the CPU has AVX-512 VNNI, on Linux, with
#: symmetric weights) only up to this many groups (``should_use_onednn_quant`` in ATen); wider
#: depthwise convs, and every linear, stay on fbgemm.
ONEDNN_MAX_GROUPS = 100


@contextmanager
def runtime_numerics(
    model: nn.Module, enabled: bool = True, target: str = "onnx"
) -> Iterator[nn.Module]:
    """Evaluate ``model``'s integer layers as the integer runtimes compute (module docstring).

    Convs, linears and matmuls compute the same in ONNX Runtime and fbgemm; residual adds do
    not (:mod:`qat.quant.runtime_add`): ``target`` picks ONNX Runtime's ``QLinearAdd``
    (``"onnx"``) or PyTorch's ``quantized::add`` (``"torchscript"``).
    ``"torchscript_x86"`` adds as ``"torchscript"`` and requantizes convs of at most
    :data:`ONEDNN_MAX_GROUPS` groups as oneDNN does (:func:`onednn_levels`).

    Example:
        >>> qat.snap_bias(qmodel, example)
        >>> with torch.no_grad(), qat.runtime_numerics(qmodel.eval()):
        ...     logits = qmodel(x)  # what model.onnx computes, to the output level
    """
    if target not in NUMERICS_TARGETS:
        raise ValueError(f"runtime_numerics: target={target!r}; allowed: {NUMERICS_TARGETS}")
    layers = [m for m in model.modules() if isinstance(m, RuntimeNumerics)]
    keys = ("exact_numerics", "numerics_target")
    before = [{k: m.__dict__.get(k) for k in keys} for m in layers]
    for m in layers:
        m.exact_numerics, m.numerics_target = enabled, target
    try:
        yield model
    finally:
        for m, old in zip(layers, before, strict=True):
            for key, value in old.items():
                if value is None:
                    m.__dict__.pop(key, None)
                else:
                    setattr(m, key, value)


def _linear_op(
    module: nn.Module,
    op: Callable[..., torch.Tensor],
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
) -> torch.Tensor:
    if not (module.exact_numerics and not module.training and x.dtype == torch.float32):
        return op(x, w, b)
    return op(x.double(), w.double(), None if b is None else b.double()).float()


def quantized_output(
    module: nn.Module,
    op: Callable[..., torch.Tensor],
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
) -> torch.Tensor:
    """``output_quant(op(x, w, b))``, requantized as the integer runtimes do when evaluating
    under :func:`runtime_numerics` a layer whose input grid :func:`qat.snap_bias` pinned.

    Both runtimes (ONNX Runtime's ``QLinearConv`` / ``QGemm``, fbgemm's requantization) compute
    ``round(float32(acc) · M) + z`` with the int32 sum ``acc`` (bias included) and the float32
    multiplier ``M = (s_in · s_w) / s_out``; quantizing the float sum instead,
    ``round(y · (1/s_out))``, rounds twice in float32. The two differ only within float32 error
    of a rounding boundary, but at 4 bits a depthwise conv's sums take a few small integer values,
    and when ``25 · M`` lands 2e-7 below x.5, every output with that sum flips: MobileNetV2 W4A4
    disagreed with both runtimes on 0.21% of the test images through one such channel.

    The bias: ONNX Runtime adds the int32 bias the exporter rounded. While the layer's bias is
    the one :func:`qat.snap_bias` left, it is rounded the same way here; a bias changed since
    is added unrounded, so that the parity report shows what its rounding costs. fbgemm
    (target ``"torchscript"``) adds the float bias as ``float32(acc) + float32(b /
    (s_in·s_w))`` before the multiply. Under ``"torchscript_x86"``, convs that the x86 engine
    runs on oneDNN requantize as :func:`onednn_levels` says instead.
    """
    oq: FakeQuantizer = module.output_quant
    raw_b = b
    snapped = grid_bias(module, b)
    if snapped is not None:
        # The grid's value with the latent bias's gradient (straight-through), exactly: a
        # ``b + (snapped − b)`` in float32 can land one ulp off the grid.
        b = snapped + (b - b.detach())
    codes = _pinned_input_codes(module, x)
    if codes is None:
        return oq(_linear_op(module, op, x, w, b), relu=module.relu)
    wq: FakeQuantizer = module.weight_quant
    s_w, _ = wq.qparams()
    shape = [-1] + [1] * (w.dim() - 1) if wq.per_channel else [1] * w.dim()
    levels = torch.round(w.double() / s_w.double().reshape(shape))
    acc = op(codes, levels, None)
    # Output channels: dim 1 of a conv's NCHW output, the last dim of a linear's (..., N).
    out_shape = [1] * acc.dim()
    out_shape[-1 if isinstance(module, nn.Linear) else 1] = -1
    s_out, z_out = oq.qparams()
    if _on_onednn(module):
        # The u8 container's zero point (ActGrid), which oneDNN adds before rounding.
        zero_point = int(z_out.reshape(-1)[0]) - oq.quant_range[0]
        scales = (module.runtime_input_scale, s_w, float(s_out.reshape(-1)[0]), zero_point)
        levels_out = onednn_levels(acc, *scales, b, out_shape)
        return oq(levels_out * s_out.float(), relu=module.relu)
    s_in = torch.tensor(module.runtime_input_scale, dtype=torch.float32, device=x.device)
    act_w = (s_in * s_w.float()).reshape(-1)  # float32, as both runtimes form it
    if b is None:
        acc32 = acc.float()
    elif module.numerics_target == "onnx" and _is_snapped_bias(module, raw_b):
        # The int32 bias the exporter writes (qat.quant.bias.int32_bias), rounded here as
        # there. After snap_bias the float bias is on that grid only to within float32 error
        # (a folded conv+BN bias to one ulp): 3e-4 of a level for a bias of 5000 levels,
        # enough to move an output whose sum lands on a tie of the output grid (in a ResNet-20
        # W8A8, sums of 357 at M = 0.5/357 picked level 0 where ONNX Runtime picks 1).
        b_levels = bias_levels(b, s_in, s_w)[0].clamp(INT32_MIN, INT32_MAX)
        acc32 = (acc + b_levels.reshape(out_shape)).float()
    elif module.numerics_target == "onnx":
        # A bias changed since snap_bias: not rounded, so that ONNX Runtime's rounding of it
        # shows in the parity report rather than being hidden.
        acc32 = (acc + (b.double() / act_w.double()).reshape(out_shape)).float()
    else:
        # fbgemm's float-bias epilogue exactly: float32(acc) + float32(b / (s_in·s_w)).
        acc32 = acc.float() + (b.detach().float() / act_w).reshape(out_shape)
    multiplier = (act_w / s_out.float()).reshape(out_shape)
    levels_out = torch.round(acc32 * multiplier)
    # The output quantizer takes these levels as they are (a value on its grid comes out
    # unchanged) and applies the ReLU and the clamp to its range; the hooks of
    # qat.quant.grids that follow the grids see this layer's output there too.
    return oq(levels_out * s_out.float(), relu=module.relu)


def static_output_grid(oq: FakeQuantizer) -> Grid | None:
    """The u8 container grid ``(scale, zero point)`` of an output quantizer that an integer
    kernel's requantization reproduces (on, calibrated, per-tensor, static, not PACT), or None."""
    if not (oq.enabled and oq.fake_quant_enabled and oq.is_initialized):
        return None
    if oq.per_channel or oq.learned == "pact" or oq.spec.dynamic != "none":
        return None
    s_out, z_out = oq.qparams()
    return float(s_out.float().reshape(-1)[0]), int(z_out.reshape(-1)[0]) - oq.quant_range[0]


def grid_values(levels: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Stored levels back to values on ``grid``, which the output quantizer keeps as they are
    (and clamps to its range and the ReLU, as the exported Clip does)."""
    scale, zero_point = grid
    return (levels - zero_point) * torch.tensor(scale, dtype=torch.float32, device=levels.device)


def stored_levels(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor | None:
    """``x``'s stored u8 values on the container grid ``(scale, zero_point)`` (float64), or
    None when ``x`` is not float32 or not on that grid (ranges moved since it was pinned)."""
    if x.dtype != torch.float32:
        return None
    s32 = torch.tensor(scale, dtype=torch.float32, device=x.device)
    codes = torch.round(x.double() / s32.double())
    if not torch.equal(codes.float() * s32, x):
        return None
    return codes + zero_point


def _is_snapped_bias(module: nn.Module, b: torch.Tensor | None) -> bool:
    """True if ``b`` is the bias :func:`qat.snap_bias` left on ``module`` (bit for bit)."""
    pinned = module.runtime_bias
    if b is None or pinned is None or pinned.shape != b.shape:
        return False
    return torch.equal(b.detach(), pinned.to(device=b.device, dtype=b.dtype))


def _on_onednn(module: nn.Module) -> bool:
    """True for a conv that PyTorch's x86 engine runs on oneDNN, when computing as it does."""
    return (
        module.numerics_target == "torchscript_x86"
        and isinstance(module, nn.Conv2d)
        and module.groups <= ONEDNN_MAX_GROUPS
    )


def onednn_levels(
    acc: torch.Tensor,
    s_in: float,
    s_w: torch.Tensor,
    s_out: float,
    zero_point: int,
    bias: torch.Tensor | None = None,
    out_shape: list[int] | None = None,
) -> torch.Tensor:
    """Output levels (``q − zero_point``) of a oneDNN int8 conv as PyTorch's x86 engine calls it.

    PyTorch hands oneDNN reciprocal scales (``float32(1 / s)``, formed in double), and ideep
    inverts them back in float32, so oneDNN multiplies by ``s_src = 1 / float32(1 / s_in)`` and
    by ``d = 1 / (1 / float32(1 / s_out))``, each a float32 division. Its epilogue, every step
    one float32 rounding (no fused multiply-add)::

        y = (float32(acc) · s_src) · float32(s_w[c]) + b[c]      (→ ReLU if fused)
        q = saturate_u8(round_half_even(y · d + zero_point))

    fbgemm and ONNX Runtime instead compute ``round(float32(acc + b / (s_in·s_w)) · M) + z``
    with ``M = float32(s_in · s_w) / s_out``: the two differ only within float32 error of a
    tie, but there they pick different levels. This formula matched the x86 engine on every one
    of over 4 million outputs, most of them built next to ties (random scales, 1x1 / 3x3 /
    strided / grouped / depthwise convs up to 100 groups, ReLU fused or not, batch 1-64).

    Args:
        acc: the exact int32 sums ``Σ (x_q − z_in) · w_q``, as float64 (bias not included).
        s_in: the input scale (as the quantized tensor holds it).
        s_w: the weight scale(s), one per output channel or one.
        s_out: the output scale.
        zero_point: the output zero point in the u8 container.
        bias: the float bias, or None.
        out_shape: how to broadcast per-channel values against ``acc`` (default: NCHW).

    Returns:
        ``q − zero_point`` as float32, before saturation (the output quantizer clamps).
    """
    if out_shape is None:
        out_shape = [1, -1] + [1] * (acc.dim() - 2)
    one = torch.ones((), dtype=torch.float32, device=acc.device)

    def f32(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.float32, device=acc.device)

    s_src = one / f32(1.0 / s_in)
    d = one / (one / f32(1.0 / s_out))
    y = acc.float() * s_src * s_w.float().reshape(out_shape)
    if bias is not None:
        y = y + bias.detach().float().reshape(out_shape)
    return torch.round(y * d + zero_point) - zero_point


def _pinned_input_codes(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as float64 integer codes (``q − z``) on the input grid snap_bias pinned, or None
    when the runtime requantization does not apply (not exact evaluation, nothing pinned, a
    quantizer off or PACT, or ``x`` off the pinned grid because ranges moved since)."""
    s_in = module.runtime_input_scale
    if not module.exact_numerics or module.training or s_in is None or x.dtype != torch.float32:
        return None
    oq: FakeQuantizer = module.output_quant
    wq: FakeQuantizer = module.weight_quant
    for quant in (oq, wq):
        if not (quant.enabled and quant.fake_quant_enabled and quant.is_initialized):
            return None
    if oq.learned == "pact":
        return None
    return stored_levels(x, s_in, 0)
