"""``QConvBn2d``: Conv2d → BatchNorm2d (→ ReLU), BN folding simulated in training, exact in eval."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat.quant.bias import grid_bias, linked_input_quantizer
from qat.quant.fold import bn_fold_factor, fold_bn_bias, fold_bn_params
from qat.quant.layers.base import (
    conv_kwargs,
    copy_weight_bias,
    like,
    output_quantizer,
    weight_quantizer,
)
from qat.quant.numerics import RuntimeNumerics, quantized_output
from qat.quant.py_state import PyStateDict
from qat.quant.spec import QuantSpec


class QConvBn2d(PyStateDict, nn.Conv2d, RuntimeNumerics):
    """Conv2d → BatchNorm2d (→ ReLU) with BN folding simulated during training.

    Training with live BN statistics follows Jacob et al. (2018) as torch.ao does: the weight
    is scaled by ``f = γ/σ_running`` before fake quantization, the result is scaled back by
    ``1/f`` and batch-normalised with the batch statistics (the batch-statistics correction),
    so the quantizer sees the folded weight the integer model will hold. The ``1/f`` is
    applied to the quantized weight, not to the conv output (the same by linearity, and much
    cheaper). In eval mode, and once
    :meth:`freeze_bn_stats` has been called, the forward *is* the folded integer graph:
    ``conv(x, fq(W·f)) + b_folded`` with the running statistics, computed by
    :func:`qat.fold_bn_params` exactly as the exporters compute it.
    """

    #: The freeze flag is a Python bool (no graph break), saved as the buffer it once was.
    PY_STATE = (("bn_frozen", "bn_frozen", torch.uint8),)

    def __init__(
        self,
        *args,
        relu: bool = False,
        bn_eps: float = 1e-5,
        bn_momentum: float | None = 0.1,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.relu = relu
        self.bn = nn.BatchNorm2d(self.out_channels, eps=bn_eps, momentum=bn_momentum)
        self.weight_quant = weight_quantizer(weight_spec, self.out_channels, axis=0)
        self.output_quant = output_quantizer(activation_spec)
        self.bn_frozen = False

    # Channels whose γ/σ is ~0 would divide by zero in the training path's un-scaling.
    _MIN_FACTOR = 1e-6

    def freeze_bn_stats(self, frozen: bool = True) -> None:
        """Stop updating BN running statistics and train on the folded graph from now on."""
        self.bn_frozen = bool(frozen)

    @property
    def is_bn_frozen(self) -> bool:
        return self.bn_frozen

    def folded_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact float ``(weight, bias)`` of conv+BN with running statistics."""
        return fold_bn_params(self.weight, self.bias, self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            w, b = self.folded_params()
            return quantized_output(self, self._conv_forward, x, self.weight_quant(w), b)
        f = bn_fold_factor(self.bn)
        f = torch.where(f.abs() < self._MIN_FACTOR, torch.full_like(f, self._MIN_FACTOR), f)
        f = f.reshape(-1, 1, 1, 1)
        # conv(x, fq(W·f)) / f == conv(x, fq(W·f) / f): un-scale the (small) weight rather
        # than the activation, which saves a full pass over the output forward and backward.
        z = self._conv_forward(x, self.weight_quant(self.weight * f) / f, self.bias)
        y = self._frozen_bn(z) if self.bn_frozen else self._live_bn(z)
        if linked_input_quantizer(self) is not None:
            with torch.no_grad():
                folded_b = fold_bn_bias(self.bias, self.bn)
            snapped = grid_bias(self, folded_b)
            if snapped is not None:
                # The folded integer layer adds ``snapped`` where the folded bias is (running
                # statistics): train with the same per-channel shift on the BN output.
                y = y + (snapped - folded_b).reshape(1, -1, 1, 1)
        return self.output_quant(y, relu=self.relu)

    def _live_bn(self, z: torch.Tensor) -> torch.Tensor:
        """Batch norm with the batch statistics, updating the running ones.

        Under ``torch.compile`` the running statistics are replaced, not updated in place:
        the training forward reads ``running_var`` for the fold factor, AOTAutograd may save
        that very tensor for the backward, and an in-place update then fails the backward's
        version check (PyTorch issue 185497; eager mode keeps the in-place update, which DDP's
        buffer broadcast relies on).
        """
        bn = self.bn
        if not torch.compiler.is_compiling():
            return bn(z)
        y = F.batch_norm(z, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        with torch.no_grad():
            dims = [d for d in range(z.dim()) if d != 1]
            var, mean = torch.var_mean(z.detach(), dim=dims, correction=1)
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum
            if momentum is None:  # a cumulative moving average, as BatchNorm2d keeps it
                momentum = 1.0 / bn.num_batches_tracked.float()
            bn.running_mean = bn.running_mean * (1 - momentum) + mean * momentum
            bn.running_var = bn.running_var * (1 - momentum) + var * momentum
        return y

    def _frozen_bn(self, z: torch.Tensor) -> torch.Tensor:
        """BN with the frozen running statistics, and the gradient of exactly that.

        The values are the folded graph's (what evaluation and the exporters compute), and so
        is the gradient: ``γ/σ · g`` for ``z``, including the components along each channel's
        batch mean and scale that live batch norm removes. Those are what lets the frozen
        network correct the drift of its own statistics as its weights move; with them
        projected out (batch norm's gradient at the frozen scale, which an earlier version
        used), ResNet-20 W4A4 lost 3 pt of validation accuracy in its freeze epoch on a 32×32
        pattern folder (93.6% against 96.6% live; 96.8% with this gradient). Their size is the
        risk (``lr · f²``, large once weight decay has shrunk the weights): the default
        gradient-norm clip (``trainer.gradient_clip_val``) bounds it (docs/design.md,
        "Simulated BN folding").
        """
        bn = self.bn
        shape = (1, -1) + (1,) * (z.dim() - 2)
        inv_std = torch.rsqrt(bn.running_var + bn.eps).reshape(shape)
        normalized = (z - bn.running_mean.reshape(shape)) * inv_std
        return normalized * bn.weight.reshape(shape) + bn.bias.reshape(shape)

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
        relu: bool = False,
    ) -> QConvBn2d:
        if conv.out_channels != bn.num_features:
            raise ValueError(
                f"cannot fuse conv with {conv.out_channels} output channels and BatchNorm2d "
                f"with {bn.num_features} features"
            )
        if not bn.track_running_stats:
            raise ValueError("cannot fuse a BatchNorm2d without running statistics")
        q = cls(
            **conv_kwargs(conv),
            relu=relu,
            bn_eps=bn.eps,
            bn_momentum=bn.momentum,
            weight_spec=weight_spec,
            activation_spec=activation_spec,
        )
        q = copy_weight_bias(q, conv)
        q.bn.load_state_dict(bn.state_dict(), strict=bn.affine)
        if not bn.affine:
            with torch.no_grad():
                q.bn.weight.fill_(1.0)
                q.bn.bias.zero_()
            q.bn.weight.requires_grad_(False)
            q.bn.bias.requires_grad_(False)
        return q

    def to_float(self) -> nn.Sequential:
        conv = copy_weight_bias(nn.Conv2d(**conv_kwargs(self)), self)
        bn = like(
            nn.BatchNorm2d(self.out_channels, eps=self.bn.eps, momentum=self.bn.momentum), self
        )
        bn.load_state_dict(self.bn.state_dict())
        layers: list[nn.Module] = [conv, bn] + ([nn.ReLU()] if self.relu else [])
        return nn.Sequential(*layers)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")
