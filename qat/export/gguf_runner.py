"""Run a GGUF file in PyTorch as llama.cpp's CPU backend computes it, to verify an export.

No llama.cpp needed: the file is read back with ``gguf.GGUFReader``, every tensor dequantized
with ``gguf.quants``, and the ``gpt2`` / ``llama`` graphs of llama.cpp (``llm_build_gpt2``,
``llm_build_llama``) run in float32 with ggml's activation rounding: the input of every matmul
with a Q4_0 / Q8_0 weight is quantized to Q8_0 blocks first, as ggml's CPU matmuls do
(``vec_dot_type``), with the reference rounding (:func:`qat.quant.blocks.gguf_quantize_reference`;
ggml's AVX path rounds exact ties to even and may differ there by one code). ``kv_f16`` also
rounds Q, K and V to fp16, as llama.cpp's default F16 KV cache does. What this does not
reproduce: ggml's fp16 GELU table and its float summation order.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from qat.quant.blocks import gguf_quantize_reference

__all__ = ["GGUFRunner"]

_QUANTIZED = ("Q4_0", "Q8_0")


class GGUFRunner:
    """``runner(ids (B, T)) → logits (B, T, V)`` for a GGUF file of arch ``gpt2`` or ``llama``.

    Args:
        path: the ``.gguf`` file.
        act_rounding: quantize matmul inputs of Q4_0 / Q8_0 weights to Q8_0 (llama.cpp).
        kv_f16: round Q, K, V to fp16 (llama.cpp's default KV cache type).
    """

    def __init__(
        self, path: str | os.PathLike[str], act_rounding: bool = True, kv_f16: bool = False
    ):
        import gguf

        reader = gguf.GGUFReader(str(path))
        self.arch = _field(reader, "general.architecture")
        self.hp = {
            key.split(".", 1)[1]: _field(reader, key)
            for key in reader.fields
            if key.startswith(f"{self.arch}.")
        }
        self.weights: dict[str, torch.Tensor] = {}
        self.types: dict[str, str] = {}
        for t in reader.tensors:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
            shape = [int(n) for n in reversed(t.shape.tolist())]  # ggml ne → numpy order
            self.weights[t.name] = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)
            self.types[t.name] = t.tensor_type.name
        self.act_rounding, self.kv_f16 = act_rounding, kv_f16
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"GGUFRunner runs gpt2 and llama files, not {self.arch!r}")

    def tensor_types(self) -> dict[str, str]:
        """GGML type name of every tensor (``Q4_0``, ``Q8_0``, ``F32``)."""
        return dict(self.types)

    # ------------------------------------------------------------------ building blocks
    def _mm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w = self.weights[f"{name}.weight"]
        if self.act_rounding and self.types[f"{name}.weight"] in _QUANTIZED:
            x = gguf_quantize_reference(x.contiguous(), "q8_0")
        y = x @ w.t()
        bias = self.weights.get(f"{name}.bias")
        return y if bias is None else y + bias

    def _layer_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w, b = self.weights[f"{name}.weight"], self.weights.get(f"{name}.bias")
        return F.layer_norm(x, (x.shape[-1],), w, b, float(self.hp["attention.layer_norm_epsilon"]))

    def _rms_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        eps = float(self.hp["attention.layer_norm_rms_epsilon"])
        return (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * self.weights[f"{name}.weight"]
        )

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.kv_f16:
            q, k, v = (z.half().float() for z in (q, k, v))
        if k.shape[1] != q.shape[1]:  # grouped-query attention
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    @staticmethod
    def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, c = x.shape
        return x.view(b, t, heads, c // heads).transpose(1, 2)

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        """ggml's ``GGML_ROPE_TYPE_NORM``: rotate adjacent pairs ``(2i, 2i+1)``."""
        t, d = x.shape[-2:]
        n = int(self.hp.get("rope.dimension_count", d))
        base = float(self.hp.get("rope.freq_base", 10000.0))
        inv = base ** (-torch.arange(0, n, 2, dtype=torch.float32) / n)
        ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]
        cos, sin = ang.cos(), ang.sin()
        x0, x1 = x[..., 0:n:2], x[..., 1:n:2]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        return torch.cat((out, x[..., n:]), dim=-1)

    # ------------------------------------------------------------------ the graphs
    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long().cpu()
        x = F.embedding(ids, self.weights["token_embd.weight"])
        if self.arch == "gpt2":
            x = x + self.weights["position_embd.weight"][: ids.shape[1]]
        for i in range(int(self.hp["block_count"])):
            x = self._gpt2_block(x, i) if self.arch == "gpt2" else self._llama_block(x, i)
        norm = self._layer_norm if self.arch == "gpt2" else self._rms_norm
        return self._mm(norm(x, "output_norm"), "output")

    def _gpt2_block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        p, heads = f"blk.{i}", int(self.hp["attention.head_count"])
        qkv = self._mm(self._layer_norm(x, f"{p}.attn_norm"), f"{p}.attn_qkv")
        q, k, v = (self._heads(z, heads) for z in qkv.chunk(3, dim=-1))
        y = self._attention(q, k, v).transpose(1, 2).reshape(x.shape)
        x = x + self._mm(y, f"{p}.attn_output")
        h = F.gelu(
            self._mm(self._layer_norm(x, f"{p}.ffn_norm"), f"{p}.ffn_up"), approximate="tanh"
        )
        return x + self._mm(h, f"{p}.ffn_down")

    def _llama_block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        p = f"blk.{i}"
        heads = int(self.hp["attention.head_count"])
        kv_heads = int(self.hp.get("attention.head_count_kv", heads))
        h = self._rms_norm(x, f"{p}.attn_norm")
        q = self._rope(self._heads(self._mm(h, f"{p}.attn_q"), heads))
        k = self._rope(self._heads(self._mm(h, f"{p}.attn_k"), kv_heads))
        v = self._heads(self._mm(h, f"{p}.attn_v"), kv_heads)
        y = self._attention(q, k, v).transpose(1, 2).reshape(x.shape)
        x = x + self._mm(y, f"{p}.attn_output")
        h = self._rms_norm(x, f"{p}.ffn_norm")
        h = F.silu(self._mm(h, f"{p}.ffn_gate")) * self._mm(h, f"{p}.ffn_up")
        return x + self._mm(h, f"{p}.ffn_down")


def _field(reader: object, key: str) -> object:
    """A scalar or string field of a GGUF file."""
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode()
    out = value.tolist()
    return out[0] if isinstance(out, list) and len(out) == 1 else out
