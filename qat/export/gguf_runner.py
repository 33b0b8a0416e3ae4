"""Run a GGUF file in PyTorch as llama.cpp's CPU backend computes it, to verify an export.

No llama.cpp needed: the file is read back with ``gguf.GGUFReader``, every tensor dequantized
with ``gguf.quants``, and llama.cpp's graphs of the ``gpt2``, ``llama``, ``qwen2``, ``qwen3``,
``gemma`` (1-3) and ``phi3`` archs (``src/models/<arch>.cpp``) run in float32 with ggml's activation
rounding: the input of every matmul with a Q4_0 / Q8_0 weight is quantized to Q8_0 blocks first, as ggml's CPU matmuls do
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


#: Archs this runner computes, and the ones of them whose rope rotates the two halves of each
#: head (llama.cpp's NEOX rope type) rather than adjacent pairs (NORM: llama).
ARCHS = ("gpt2", "llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")
_NEOX = ("qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")
_GEMMA = ("gemma", "gemma2", "gemma3")


class GGUFRunner:
    """``runner(ids (B, T)) → logits (B, T, V)`` for a GGUF file of an arch in :data:`ARCHS`.

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
        if self.arch not in ARCHS:
            raise ValueError(
                f"GGUFRunner computes {', '.join(ARCHS)} files, not {self.arch!r}: verify it in "
                "llama.cpp (pip install 'qat[llamacpp]')"
            )
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
        if "output.weight" not in self.weights:  # tied: llama.cpp reads token_embd
            self.weights["output.weight"] = self.weights["token_embd.weight"]
            self.types["output.weight"] = self.types["token_embd.weight"]
        self.act_rounding, self.kv_f16 = act_rounding, kv_f16
        self.heads = int(self.hp["attention.head_count"])
        self.kv_heads = int(self.hp.get("attention.head_count_kv", self.heads))
        n_embd = int(self.hp["embedding_length"])
        self.head_dim = int(self.hp.get("attention.key_length", n_embd // self.heads))

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

    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int = 0
    ) -> torch.Tensor:
        if self.kv_f16:
            q, k, v = (z.half().float() for z in (q, k, v))
        if k.shape[1] != q.shape[1]:  # grouped-query attention
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        t = q.shape[-2]
        window = self._window(layer)
        cap = float(self.hp.get("attn_logit_softcapping", 0.0) or 0.0)
        if not cap and window is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        scores = (q @ k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
        if cap:  # Gemma 2: cap · tanh(scores / cap)
            scores = torch.tanh(scores / cap) * cap
        pos = torch.arange(t)
        mask = pos[None, :] > pos[:, None]
        if window is not None:
            mask = mask | (pos[:, None] - pos[None, :] >= window)
        return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v

    def _window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (Gemma 2 / 3 sliding layers), else None."""
        pattern = self.hp.get("attention.sliding_window_pattern")
        if pattern is None or not pattern[layer]:
            return None
        return int(self.hp["attention.sliding_window"])

    @staticmethod
    def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, c = x.shape
        return x.view(b, t, heads, c // heads).transpose(1, 2)

    def _rope(self, x: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """ggml's rope: ``NORM`` rotates adjacent pairs ``(2i, 2i+1)`` (llama), ``NEOX`` the
        pairs ``(i, i + n/2)`` (the other families)."""
        t, d = x.shape[-2:]
        n = int(self.hp.get("rope.dimension_count", d))
        base = float(self.hp.get("rope.freq_base", 10000.0))
        if self._window(layer) is not None:  # sliding layers: their own base (Gemma 3)
            base = float(self.hp.get("rope.freq_base_swa", base))
        inv = base ** (-torch.arange(0, n, 2, dtype=torch.float32) / n)
        ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]
        cos, sin = ang.cos(), ang.sin()
        if self.arch in _NEOX:
            x0, x1 = x[..., : n // 2], x[..., n // 2 : n]
            out = torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        else:
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
        if self.arch in _GEMMA:  # ggml_scale(inpL, sqrtf(n_embd))
            x = x * torch.tensor(float(self.hp["embedding_length"])).sqrt()
        for i in range(int(self.hp["block_count"])):
            x = self._gpt2_block(x, i) if self.arch == "gpt2" else self._rms_block(x, i)
        norm = self._layer_norm if self.arch == "gpt2" else self._rms_norm
        logits = self._mm(norm(x, "output_norm"), "output")
        cap = float(self.hp.get("final_logit_softcapping", 0.0) or 0.0)
        return torch.tanh(logits / cap) * cap if cap else logits

    def _gpt2_block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        p, heads = f"blk.{i}", self.heads
        qkv = self._mm(self._layer_norm(x, f"{p}.attn_norm"), f"{p}.attn_qkv")
        q, k, v = (self._heads(z, heads) for z in qkv.chunk(3, dim=-1))
        y = self._attention(q, k, v).transpose(1, 2).reshape(x.shape)
        x = x + self._mm(y, f"{p}.attn_output")
        h = F.gelu(
            self._mm(self._layer_norm(x, f"{p}.ffn_norm"), f"{p}.ffn_up"), approximate="tanh"
        )
        return x + self._mm(h, f"{p}.ffn_down")

    def _qkv(self, h: torch.Tensor, p: str) -> tuple[torch.Tensor, ...]:
        if f"{p}.attn_qkv.weight" in self.weights:  # Phi-3's fused projection
            q_n, kv_n = self.heads * self.head_dim, self.kv_heads * self.head_dim
            return self._mm(h, f"{p}.attn_qkv").split((q_n, kv_n, kv_n), dim=-1)
        return tuple(self._mm(h, f"{p}.attn_{z}") for z in "qkv")

    def _rms_block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """llama.cpp's llama / qwen2 / qwen3 / gemma (1-3) / phi3 block."""
        p = f"blk.{i}"
        h = self._rms_norm(x, f"{p}.attn_norm")
        q, k, v = self._qkv(h, p)
        q, k = self._heads(q, self.heads), self._heads(k, self.kv_heads)
        v = self._heads(v, self.kv_heads)
        if f"{p}.attn_q_norm.weight" in self.weights:  # Qwen 3, Gemma 3: RMSNorm of each head
            q, k = self._rms_norm(q, f"{p}.attn_q_norm"), self._rms_norm(k, f"{p}.attn_k_norm")
        q, k = self._rope(q, i), self._rope(k, i)
        b, t = x.shape[:2]
        y = self._attention(q, k, v, i).transpose(1, 2).reshape(b, t, -1)
        y = self._mm(y, f"{p}.attn_output")
        if f"{p}.post_attention_norm.weight" in self.weights:  # Gemma 2 / 3
            y = self._rms_norm(y, f"{p}.post_attention_norm")
        x = x + y
        h = self._rms_norm(x, f"{p}.ffn_norm")
        if f"{p}.ffn_gate.weight" in self.weights:
            gate, up = self._mm(h, f"{p}.ffn_gate"), self._mm(h, f"{p}.ffn_up")
        else:  # Phi-3's fused gate_up: the gate is the first half
            gate, up = self._mm(h, f"{p}.ffn_up").chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh") if self.arch in _GEMMA else F.silu(gate)
        y = self._mm(act * up, f"{p}.ffn_down")
        if f"{p}.post_ffw_norm.weight" in self.weights:  # Gemma 2 / 3
            y = self._rms_norm(y, f"{p}.post_ffw_norm")
        return x + y


def _field(reader: object, key: str) -> object:
    """A scalar, string or array field of a GGUF file."""
    return reader.fields[key].contents()


class LlamaCppRunner:
    """``runner(ids (B, T)) → logits (B, T, V)`` from real llama.cpp (``llama-cpp-python``,
    the ``llamacpp`` extra): each row evaluated from an empty KV cache, every position's logits.

    Args:
        path: the ``.gguf`` file.
        threads: llama.cpp's CPU threads.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int = 2):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(path),
            n_ctx=0,
            logits_all=True,
            n_threads=threads,
            verbose=False,
            type_k=0,  # GGML_TYPE_F32 KV cache: the file is checked, not the f16 cache's rounding
            type_v=0,
        )

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokens of ``text`` (no BOS added, special tokens as plain text)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in ids.long().cpu().tolist():
            self.llm.reset()
            self.llm.eval(row)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(row)], dtype=np.float32)))
        return torch.stack(rows)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """``n`` greedy tokens after ``prompt`` (argmax of llama.cpp's logits, KV cache kept)."""
        self.llm.reset()
        self.llm.eval(prompt)
        out = []
        for _ in range(n):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            self.llm.eval([token])
        return out


def llama_cpp_available() -> bool:
    """True when ``llama-cpp-python`` imports (``pip install 'qat[llamacpp]'``)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True
