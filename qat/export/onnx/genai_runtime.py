"""Running an onnxruntime-genai folder that :mod:`qat.export.onnx.genai` wrote: its
``model.onnx`` in ONNX Runtime (the verify step), generation through onnxruntime-genai, and
the fake-quant model's own greedy tokens to compare with."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qat.export.onnx.genai import GENAI_CONFIG

__all__ = [
    "genai_generate",
    "greedy_tokens",
    "load_genai_runtime",
    "verify_genai",
]


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / GENAI_CONFIG).read_text())["model"]


def load_genai_runtime(
    folder: str | Path, threads: int = 2
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``ids (B, T) → logits (B, T, V)`` of a genai folder's ``model.onnx`` in ONNX Runtime,
    the whole sequence at once with an empty KV cache (the verify step's runtime)."""
    from qat.export.onnx import make_session

    folder = Path(folder)
    cfg = _config(folder)
    dec = cfg["decoder"]
    session = make_session(folder / dec["filename"], threads=threads, spinning=False)
    names = {i.name for i in session.get_inputs()}
    past = [
        (dec["inputs"]["past_key_names"] % i, dec["inputs"]["past_value_names"] % i)
        for i in range(dec["num_hidden_layers"])
    ]
    logits_name = dec["outputs"]["logits"]

    def run(ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        empty = np.zeros((b, dec["num_key_value_heads"], 0, dec["head_size"]), np.float32)
        feeds: dict[str, np.ndarray] = {
            "input_ids": ids.cpu().long().numpy(),
            "attention_mask": np.ones((b, t), np.int64),
        }
        if "position_ids" in names:
            feeds["position_ids"] = np.tile(np.arange(t, dtype=np.int64), (b, 1))
        for k, v in past:
            feeds[k] = feeds[v] = empty
        (out,) = session.run([logits_name], feeds)
        return torch.from_numpy(np.asarray(out)).float()

    return run


def genai_generate(
    folder: str | Path, prompt: list[int], max_new_tokens: int, threads: int = 2
) -> list[int]:
    """Greedy tokens ``onnxruntime-genai`` generates from ``prompt`` (the new ones only; it
    stops early at the end-of-sequence token)."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(
        do_sample=False, max_length=len(prompt) + max_new_tokens, batch_size=1
    )
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray([prompt], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)[len(prompt) :]]


@torch.no_grad()
def greedy_tokens(model: nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The fake-quant model's greedy tokens with its KV cache (one token per decode step, as
    the genai file runs), stopping after the end-of-sequence token as genai does."""
    model = model.eval()
    eos = model.config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    ids = torch.tensor([prompt])
    out = model(input_ids=ids, use_cache=True)
    # transformers 5 names the cache ``cache`` (``past_key_values`` before).
    key = "cache" if getattr(out, "cache", None) is not None else "past_key_values"
    new: list[int] = []
    for _ in range(max_new_tokens):
        tok = int(out.logits[0, -1].argmax())
        new.append(tok)
        if tok in eos:
            break
        out = model(input_ids=torch.tensor([[tok]]), use_cache=True, **{key: getattr(out, key)})
    return new


def _kl_sum(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Sum over positions of ``KL(softmax(ref) ‖ softmax(out))`` in nats (float64)."""
    p = torch.log_softmax(ref.flatten(0, -2).double(), dim=-1)
    q = torch.log_softmax(out.flatten(0, -2).double(), dim=-1)
    return float((p.exp() * (p - q)).sum())


@torch.no_grad()
def verify_genai(
    model: nn.Module,
    folder: str | Path,
    batches: Iterable[Any],
    max_batches: int | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    """The genai folder's whole-sequence logits (:func:`load_genai_runtime`) against the
    fake-quant model's on ``(ids, targets)`` batches: one runtime entry of
    :func:`qat.export.verify_lm.verify_lm_artifacts`' report (``agreement``, ``perplexity``,
    ``reference_perplexity``, ``ppl_rel_diff``, ``mean_kl``, ``max_abs_diff``,
    ``mean_abs_diff``), which :func:`~qat.export.verify_lm.check_lm_parity` checks."""
    from qat.export.lm_io import logits_of

    ref_model = copy.deepcopy(model).cpu().eval()
    run = load_genai_runtime(folder, threads)
    agree, tokens, nll, ref_nll, kl, dmax, dsum, count = 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        ref = logits_of(ref_model, x).float()
        out = run(x)
        diff = (out - ref).abs()
        agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
        tokens += y.numel()
        nll += float(F.cross_entropy(out.flatten(0, -2).double(), y.flatten(), reduction="sum"))
        ref_nll += float(F.cross_entropy(ref.flatten(0, -2).double(), y.flatten(), reduction="sum"))
        kl += _kl_sum(ref, out)
        dmax, dsum, count = (
            max(dmax, float(diff.max())),
            dsum + float(diff.sum()),
            count + diff.numel(),
        )
    if tokens == 0:
        raise ValueError("verify_genai got no batches")
    ppl, ref_ppl = math.exp(nll / tokens), math.exp(ref_nll / tokens)
    return {
        "agreement": agree / tokens,
        "perplexity": ppl,
        "reference_perplexity": ref_ppl,
        "ppl_rel_diff": abs(ppl - ref_ppl) / ref_ppl,
        "mean_kl": kl / tokens,
        "max_abs_diff": dmax,
        "mean_abs_diff": dsum / max(count, 1),
    }
