"""Integer export of trained fake-quant models: TorchScript and ONNX, verified and timed.

Public API (what ``qat.lit`` and ``python -m qat.export`` call):

- :func:`export_model` — fake-quant model → ``model.ts`` (PyTorch quantized CPU kernels) and
  ``model.onnx`` (QDQ for ONNX Runtime), written atomically after a smoke test;
- :func:`verify_artifacts` / :func:`check_parity` / :class:`ParityError` — the exported models
  against the fake-quant model (accuracy, top-1 agreement, logit error in output steps);
- :func:`benchmark_artifacts` — latency / throughput / size, float beside integer;
- :func:`run_export` — all three as one stage, as training runs it.

Language models (``task: language_model``): :func:`export_lm` (``model.gguf`` for llama.cpp,
``model.onnx`` with ONNX Runtime's ``MatMulNBits`` / dynamic int8 kernels),
:func:`verify_lm_artifacts` / :func:`check_lm_parity` (next-token agreement, KL divergence,
perplexity) and
:func:`run_lm_export`, the same stage for them.

Layout: :mod:`~qat.export.convert` reads the trained quantizers into :mod:`~qat.export.ir`;
:mod:`~qat.export.lowering` decides, for every target alike, which layers run on integer
kernels; :mod:`~qat.export.onnx` and :mod:`~qat.export.torchscript` emit them. Importing this
package loads neither onnx nor onnxruntime (the target modules do, when used).

Example:
    >>> qmodel = qat.prepare(model, recipe)
    >>> qat.calibrate(qmodel, batches)            # or QAT training
    >>> qat.snap_bias(qmodel, x)                  # biases on the runtimes' int32 grid
    >>> paths = export_model(qmodel, "run/export", example_input=x)
    >>> report = verify_artifacts(qmodel, paths, test_loader)
    >>> check_parity(report)                      # raises ParityError on disagreement
"""

from qat.export.artifacts import FILENAMES, TARGETS, export_model
from qat.export.bench import benchmark_artifacts
from qat.export.convert import check_exportable, convert
from qat.export.gguf import export_gguf
from qat.export.ir import ConvertedModel
from qat.export.stage import parity_failure, run_export
from qat.export.stage_lm import export_lm, run_lm_export
from qat.export.verify import ParityError, check_parity, verify_artifacts
from qat.export.verify_lm import check_lm_parity, verify_lm_artifacts

__all__ = [
    "FILENAMES",
    "TARGETS",
    "ConvertedModel",
    "ParityError",
    "benchmark_artifacts",
    "check_exportable",
    "check_lm_parity",
    "check_parity",
    "convert",
    "export_gguf",
    "export_lm",
    "export_model",
    "parity_failure",
    "run_export",
    "run_lm_export",
    "verify_artifacts",
    "verify_lm_artifacts",
]
