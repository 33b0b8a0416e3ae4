"""ONNX export in QDQ format, for ONNX Runtime (and TensorRT / CUDA execution providers).

The graph (opset 17 by default, 21 with packed INT4 weights) is what ONNX Runtime's QDQ
optimizer turns into integer kernels on CPU:

- every integer layer reads ``DequantizeLinear`` inputs and ends in ``QuantizeLinear``:
  ``DQ(x) , DQ(W int8) , DQ(b int32 at s_in·s_w) → Conv → Q`` becomes ``QLinearConv``;
  ``Gemm`` (``transB=1``, weights ``(N, K)``, per-channel axis 0) becomes ``QGemm``;
  ``Concat`` becomes ``QLinearConcat``, ``GlobalAveragePool`` ``QLinearGlobalAveragePool``;
  ``MaxPool`` / ``Flatten`` / ``Reshape`` between ``DQ`` and ``Q`` run on uint8 directly;
- residual adds are ``DQ, DQ → Add → Q``, fused into ``QLinearAdd``, whose x86 kernel adds
  the stored levels with scale ratios and FMAs; the fake-quant model computes the same under
  :func:`qat.runtime_numerics` (:mod:`qat.quant.runtime_add`), so they agree exactly;
- float islands (activations, LayerNorm, softmax, products of activations) are
  ``DQ → op → Mul(1/s) → Q(scale 1)``: ``QuantizeLinear`` divides by the scale
  while the fake-quant model multiplies by the float32 reciprocal, which rounds a value within
  an ulp of a level boundary the other way; multiplied first, the island rounds exactly as
  the fake-quant model does, and ONNX Runtime does not fuse it into an integer kernel that
  rounds otherwise (``QLinearSoftmax``, ``QLinearSigmoid``, ``QLinearMul``). Average pooling
  keeps a plain ``Q`` so that it fuses into ``QLinearGlobalAveragePool``;
- weights are int8 initializers (sub-8-bit weights as int8 holding the narrow grid, or packed
  INT4 with ``int4_packed=True``, widened by a ``Cast`` to int8 that ONNX Runtime folds at
  load, before its QDQ fusion), never ``Q → DQ`` of float weights; biases are int32
  initializers; activations are uint8 with zero points (the fast u8 × s8 path on x86);
- a fused ReLU with a non-zero zero point, and every sub-8-bit activation grid, become an
  integer ``Clip`` on the uint8 tensor after ``Q`` (``relu`` then quantize equals quantize then
  ``max(q, z)``), so they never break the fusion;
- per-channel weight axes: Conv ``W (M, C/g, kH, kW)`` axis 0; Gemm with ``transB=1`` and
  ``W (N, K)`` axis 0 (ORT's own weight-quantization pass expects axis ``0 if transB else 1``
  for Gemm, and QGemm reproduces the fake-quant outputs with it); a linear layer on ``(…, K)``
  input is ``Reshape`` (uint8) → Gemm → ``Reshape``, so every linear layer is a ``QGemm``;
- layers the recipe keeps in float (``skip``, 32-bit weights) read their input through a
  per-axis ``DQ`` so that ORT's ``WeightBiasQuantization`` pass does not quietly quantize their
  weights to int8.

The int32 bias is rounded at ``s_in · s_w`` as every integer runtime does; the fake-quant model
adds the float bias unless :func:`qat.snap_bias` was applied (see :mod:`qat.export.convert`).

How the graph is built: the fake-quant model is deep-copied and each quantized layer is swapped
for a module whose forward runs the fake-quant arithmetic and whose ONNX *symbolic* emits the QDQ
nodes above from :mod:`qat.export.ir`'s description (exact BN fold, integer weights, int32
bias, trained scales; :mod:`~qat.export.onnx.emit`). ``torch.onnx.export(..., dynamo=False)`` traces the model's own forward
(arbitrary Python), so grid-preserving ops written in it (ReLU, max-pool, flatten, view) are
exported as they are. Each integer layer re-quantizes its input with the producer's grid
(``Q → DQ``, lossless), the standard QDQ form; a post-pass then removes every ``DQ → Q`` pair
with identical parameters, so no requantization is left between layers
(:mod:`~qat.export.onnx.passes`).

The TorchScript-based exporter (``dynamo=False``) is deprecated upstream but is the one that
calls ``autograd.Function.symbolic``; it is used in :mod:`~qat.export.onnx.build` only.
"""

from qat.export.onnx.build import (
    DEFAULT_OPSET,
    build_onnx_model,
    export_float_onnx,
    export_onnx,
    float_onnx_bytes,
    resolve_opset,
)
from qat.export.onnx.passes import INT4_OPSET, compact_names, finalize
from qat.export.onnx.runtime import (
    INTEGER_DATA_OP_TYPES,
    INTEGER_OP_TYPES,
    default_providers,
    make_session,
    optimized_op_types,
    run_session,
    runtime_graph,
)

__all__ = [
    "DEFAULT_OPSET",
    "INT4_OPSET",
    "INTEGER_DATA_OP_TYPES",
    "INTEGER_OP_TYPES",
    "build_onnx_model",
    "compact_names",
    "default_providers",
    "export_float_onnx",
    "export_onnx",
    "finalize",
    "float_onnx_bytes",
    "make_session",
    "optimized_op_types",
    "resolve_opset",
    "run_session",
    "runtime_graph",
]
