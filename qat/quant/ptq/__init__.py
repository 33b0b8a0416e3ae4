"""Post-training weight quantization baselines for language models, on a prepared model.

Each works on the layers :func:`qat.prepare` made (``QLinear``, Hugging Face ``Conv1D``) with
the weight grids of their recipe (per-group affine, GGUF's Q4_0 / Q8_0, per-channel), writes
the quantized weights back together with their scales, and switches the weight observers off,
so the fake-quant model (and every exporter) computes exactly those weights:

- :func:`rtn`: round to nearest with the observed scales (what ``llama-quantize`` does for Q4_0);
- :func:`gptq`: GPTQ (Frantar et al. 2023), column by column with second-order error feedback,
  layer after layer on the inputs the already-quantized layers produce;
- :func:`awq`: AWQ (Lin et al. 2024), activation-aware per-channel scales folded into the
  preceding norm, and a clipping search per group.
"""

from qat.quant.ptq.awq import awq
from qat.quant.ptq.gptq import gptq
from qat.quant.ptq.rtn import rtn

__all__ = ["awq", "gptq", "rtn"]
