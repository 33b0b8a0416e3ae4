"""qat: quantization-aware training whose exported integer models agree with the trained ones.

Python API (see README): ``prepare`` a float model with a ``Recipe``, ``calibrate`` its ranges,
train it in any loop (or with ``qat.callbacks.QATCallback`` under Lightning), then export.
"""

from qat.bias_quant import link_bias_quantizers
from qat.bn_reestimate import reestimate_bn
from qat.fold import fold_bn, fold_bn_params
from qat.modules import (
    FloatLayer,
    QAct,
    QAdd,
    QCat,
    QConv2d,
    QConvBn2d,
    QLinear,
    exact_accumulation,
)
from qat.ops import Add, Cat
from qat.prepare import calibrate, is_prepared, prepare, quantizer_summary
from qat.quantizers import (
    FakeQuantizer,
    NonFiniteError,
    anneal_bits,
    iter_quantizers,
    set_fake_quant,
    set_observers,
    uninitialized_quantizers,
)
from qat.spec import LayerOverride, QuantSpec, Recipe

__version__ = "0.1.0"

__all__ = [
    "Add",
    "Cat",
    "FakeQuantizer",
    "FloatLayer",
    "LayerOverride",
    "NonFiniteError",
    "QAct",
    "QAdd",
    "QCat",
    "QConv2d",
    "QConvBn2d",
    "QLinear",
    "QuantSpec",
    "Recipe",
    "__version__",
    "anneal_bits",
    "calibrate",
    "exact_accumulation",
    "fold_bn",
    "fold_bn_params",
    "is_prepared",
    "iter_quantizers",
    "link_bias_quantizers",
    "prepare",
    "quantizer_summary",
    "reestimate_bn",
    "set_fake_quant",
    "set_observers",
    "uninitialized_quantizers",
]
