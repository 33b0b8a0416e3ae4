"""The quantization core: torch only, no Lightning, no config library, no export.

Specs and recipes (:mod:`~qat.quant.spec`), the fake-quant kernels and quantizer, the quantized
layers, :func:`prepare` / :func:`calibrate`, BN folding and re-estimation, the int32 bias grid,
runtime numerics and the QAT schedule. The exporters (:mod:`qat.export`) and the Lightning app
(:mod:`qat.lit`) build on it; it imports neither.
"""

from qat.quant.bias import bias_levels, grid_bias
from qat.quant.bit_allocation import Allocation, allocate_bits
from qat.quant.bn_reestimate import reestimate_bn
from qat.quant.calibrate import calibrate
from qat.quant.control import (
    anneal_bits,
    is_prepared,
    iter_quantizers,
    quantizer_summary,
    set_fake_quant,
    set_observers,
    uninitialized_quantizers,
)
from qat.quant.diagnostics import locate_non_finite, quantization_stats
from qat.quant.fold import fold_bn, fold_bn_params
from qat.quant.integer_bias import link_bias_quantizers, snap_bias
from qat.quant.layers import FloatLayer, QAct, QAdd, QCat, QConv2d, QConvBn2d, QLinear
from qat.quant.numerics import runtime_numerics
from qat.quant.prepare import prepare
from qat.quant.quantizer import FakeQuantizer, NonFiniteError
from qat.quant.schedule import Anneal, Phase, Schedule
from qat.quant.sensitivity import Sensitivity, sensitivity
from qat.quant.spec import LayerOverride, QuantSpec, Recipe

__all__ = [
    "Allocation",
    "Anneal",
    "FakeQuantizer",
    "FloatLayer",
    "LayerOverride",
    "NonFiniteError",
    "Phase",
    "QAct",
    "QAdd",
    "QCat",
    "QConv2d",
    "QConvBn2d",
    "QLinear",
    "QuantSpec",
    "Recipe",
    "Schedule",
    "Sensitivity",
    "allocate_bits",
    "anneal_bits",
    "bias_levels",
    "calibrate",
    "fold_bn",
    "fold_bn_params",
    "grid_bias",
    "is_prepared",
    "iter_quantizers",
    "link_bias_quantizers",
    "locate_non_finite",
    "prepare",
    "quantization_stats",
    "quantizer_summary",
    "reestimate_bn",
    "runtime_numerics",
    "sensitivity",
    "set_fake_quant",
    "set_observers",
    "snap_bias",
    "uninitialized_quantizers",
]
