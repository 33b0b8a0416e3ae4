"""Quantized layers: a torch layer plus its quantizers; each implements only its forward.

Every quantized layer fake-quantizes its weight (when it has one) and its *output*
(``output_quant``), so each tensor flowing between layers lives on one integer grid, as in the
integer runtimes. Grid-preserving ops between them (ReLU, max-pool, flatten, dropout in eval)
need no quantizer; ops that leave the grid (average pooling, residual add, concat, non-ReLU
activations) get one here.

``QConv2d`` / ``QLinear`` / ``QConvBn2d`` subclass their float layer, so parameter names and
``isinstance`` checks stay the same.
"""

from qat.quant.layers.act import FloatLayer, QAct
from qat.quant.layers.combine import QAdd, QCat
from qat.quant.layers.computed_conv import QComputedConv2d
from qat.quant.layers.conv import QConv2d
from qat.quant.layers.conv1d import QConv1D, is_hf_conv1d
from qat.quant.layers.conv_bn import QConvBn2d
from qat.quant.layers.embedding import QEmbedding
from qat.quant.layers.linear import QLinear
from qat.quant.layers.matmul import QMatMul

#: Quantized layer types, for walkers that need to tell them apart from float ones.
QUANT_MODULES = (
    QConv2d,
    QLinear,
    QConvBn2d,
    QAdd,
    QCat,
    QMatMul,
    QAct,
    FloatLayer,
    QEmbedding,
    QConv1D,
)
#: Layers that run on the integer conv / matmul kernels (weight, bias, input grid).
WEIGHTED_MODULES = (QConv2d, QConvBn2d, QLinear)

__all__ = [
    "QUANT_MODULES",
    "WEIGHTED_MODULES",
    "FloatLayer",
    "QAct",
    "QAdd",
    "QCat",
    "QComputedConv2d",
    "QConv1D",
    "QConv2d",
    "QConvBn2d",
    "QEmbedding",
    "QLinear",
    "QMatMul",
    "is_hf_conv1d",
]
