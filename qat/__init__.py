"""qat: quantization-aware training whose exported integer models agree with the trained ones.

Python API (see README): ``prepare`` a float model with a ``Recipe``, ``calibrate`` its ranges,
train it in any loop (or with ``qat.lit.QATCallback`` under Lightning), ``snap_bias``, then
export with ``qat.export``. Importing ``qat`` loads torch only: no Lightning, no ONNX.
"""

# First: lets torchvision import where its compiled ops cannot load (see that module).
import qat.torchvision_compat  # noqa: F401  # isort: split
from qat.ops import Add, Cat
from qat.quant import (
    FakeQuantizer,
    FloatLayer,
    LayerOverride,
    NonFiniteError,
    QAct,
    QAdd,
    QCat,
    QConv2d,
    QConvBn2d,
    QLinear,
    QuantSpec,
    Recipe,
    Schedule,
    Sensitivity,
    allocate_bits,
    anneal_bits,
    calibrate,
    fold_bn,
    fold_bn_params,
    is_prepared,
    iter_quantizers,
    link_bias_quantizers,
    prepare,
    quantizer_summary,
    reestimate_bn,
    runtime_numerics,
    sensitivity,
    set_fake_quant,
    set_observers,
    snap_bias,
    uninitialized_quantizers,
)

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
    "Schedule",
    "Sensitivity",
    "__version__",
    "allocate_bits",
    "anneal_bits",
    "calibrate",
    "fold_bn",
    "fold_bn_params",
    "is_prepared",
    "iter_quantizers",
    "link_bias_quantizers",
    "prepare",
    "quantizer_summary",
    "reestimate_bn",
    "runtime_numerics",
    "sensitivity",
    "set_fake_quant",
    "set_observers",
    "snap_bias",
    "uninitialized_quantizers",
]
