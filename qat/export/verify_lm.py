"""Parity of exported language models with the fake-quant model: next-token agreement, perplexity.

:func:`verify_lm_artifacts` runs the fake-quant model (eval) and every exported runtime
(ONNX Runtime for ``onnx*`` files, :class:`~qat.export.gguf_runner.GGUFRunner` for ``gguf*``:
llama.cpp's graphs in PyTorch; where ``llama-cpp-python`` is installed, each GGUF file also
runs in real llama.cpp as ``gguf_llamacpp``)
on the same token batches and reports, per runtime, against the fake-quant model over every
position: the top-1 next-token agreement, the mean KL divergence of the next-token
distributions (``KL(fake-quant ‖ runtime)``, nats), the perplexity of each on the targets and
their relative difference, and the logit differences. :func:`check_lm_parity` turns it into
pass / fail with defaults (:data:`DEFAULT_MIN_AGREEMENT` 99.9%, :data:`DEFAULT_MAX_KL`,
:data:`DEFAULT_MAX_PPL_REL_DIFF` 0.1%), the same on every x86 CPU: statistics, not
bit-equality, because ONNX Runtime's float32 kernels sum in an order that depends on the CPU
(AVX2, AVX-512).

Each runtime also reports ``tie_margin``: the largest margin, in nats, by which the fake-quant
model preferred its own top-1 over the runtime's at a position where they disagree (0 when
none does): small values mean the disagreements are near-ties of the model, which float32
rounding in another order flips.

ONNX files with float64 islands (the bit-exact opt-in of
:func:`qat.export.onnx.llm.build_lm_onnx`) are compared with the
fake-quant model evaluated as ONNX Runtime computes them (:func:`qat.runtime_numerics`: its integer kernels' float
epilogues, float islands in float64), as the classification exports are; ONNX files with
float32 islands, and the GGUF runner, which computes with PyTorch's own float kernels, are
compared with the plain evaluation. ``fake_quant.perplexity`` is the plain one.

Report layout::

    {"num_tokens": 8192,
     "fake_quant": {"perplexity": 3.21},
     "runtimes": {"onnx": {"agreement": 1.0, "perplexity": 3.21, "reference_perplexity": 3.21,
                           "ppl_rel_diff": 0.0, "mean_kl": 0.0, "tie_margin": 0.0,
                           "max_abs_diff": 0.0, "mean_abs_diff": 0.0},
                  "gguf": {...}}}
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qat.export.lm_io import logits_of
from qat.export.verify import ParityError
from qat.quant.numerics import runtime_numerics

__all__ = [
    "DEFAULT_MAX_KL",
    "DEFAULT_MAX_PPL_REL_DIFF",
    "DEFAULT_MIN_AGREEMENT",
    "LLAMA_CPP_SUFFIX",
    "check_lm_parity",
    "load_lm_runtime",
    "perplexity",
    "verify_lm_artifacts",
    "with_llama_cpp",
]

#: Runtime names ending so run the GGUF file in real llama.cpp (``llama-cpp-python``).
LLAMA_CPP_SUFFIX = "_llamacpp"


def load_lm_runtime(
    kind: str, path: str | Path, threads: int = 2
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``ids → logits`` for an exported language model (``onnx*``, ``gguf*`` or ``hf*`` key)."""
    if kind.startswith("hf"):
        from qat.export.hf_checkpoint import load_hf_checkpoint

        return load_hf_checkpoint(path)
    if kind.startswith("gguf"):
        from qat.export.gguf_runner import GGUFRunner, LlamaCppRunner

        if kind.endswith(LLAMA_CPP_SUFFIX):
            return LlamaCppRunner(path, threads)  # real llama.cpp (the llamacpp extra)
        return GGUFRunner(path)  # llama.cpp's graphs in PyTorch
    if kind.startswith("onnx"):
        from qat.export.onnx import make_session

        session = make_session(path, threads=threads, spinning=False)

        def run(ids: torch.Tensor) -> torch.Tensor:
            out = session.run(None, {"input_ids": ids.cpu().long().numpy()})[0]
            return torch.from_numpy(np.asarray(out)).float()

        return run
    raise ValueError(f"unknown LM runtime {kind!r}: expected a key starting with onnx, gguf or hf")


def with_llama_cpp(artifacts: Mapping[str, str | Path]) -> dict[str, str | Path]:
    """``artifacts`` plus, where ``llama-cpp-python`` is installed, each GGUF file once more
    under ``<name>_llamacpp``: run in real llama.cpp beside the PyTorch runner."""
    from qat.export.gguf_runner import llama_cpp_available

    out = dict(artifacts)
    if llama_cpp_available():
        for name, path in artifacts.items():
            # llama.cpp refuses a file without a vocabulary (it reads n_vocab 0)
            gguf_file = name.startswith("gguf") and not name.endswith(LLAMA_CPP_SUFFIX)
            if gguf_file and _has_vocab(path):
                out[f"{name}{LLAMA_CPP_SUFFIX}"] = path
    return out


def _has_vocab(path: str | Path) -> bool:
    """Whether the GGUF file carries a vocabulary (``tokenizer.ggml.model`` is not ``no_vocab``)."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.model")
    return field is not None and field.contents() != "no_vocab"


def _exact_onnx(name: str, path: str | Path) -> bool:
    """An ONNX file whose float islands are float64 (``qat.float_islands``): the fake-quant
    model under :func:`qat.runtime_numerics` computes it exactly. Files with float32 islands
    (or from before the key) are compared with the plain evaluation."""
    if not name.startswith("onnx"):
        return False
    import onnx

    from qat.export.onnx.llm import ISLANDS_KEY

    proto = onnx.load(str(path), load_external_data=False)
    return any(p.key == ISLANDS_KEY and p.value == "float64" for p in proto.metadata_props)


def _kl_sum(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Sum over positions of ``KL(softmax(ref) ‖ softmax(out))`` in nats, in float64."""
    p = F.log_softmax(ref.flatten(0, -2).double(), dim=-1)
    q = F.log_softmax(out.flatten(0, -2).double(), dim=-1)
    return float((p.exp() * (p - q)).sum())


def _tie_margin(ref: torch.Tensor, out: torch.Tensor) -> float:
    """The largest ``log p(ref's top-1) − log p(out's top-1)`` under ``ref`` where the two
    top-1 differ (0.0 where none does)."""
    a, b = ref.argmax(-1), out.argmax(-1)
    differ = a != b
    if not bool(differ.any()):
        return 0.0
    logp = F.log_softmax(ref[differ].double(), dim=-1)
    gap = logp.gather(-1, a[differ][:, None]) - logp.gather(-1, b[differ][:, None])
    return float(gap.max())


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(
        F.cross_entropy(logits.flatten(0, -2).double(), targets.flatten(), reduction="sum")
    )


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[Any], max_batches: int | None = None) -> float:
    """``exp(mean next-token NLL)`` of ``model`` on ``(ids, targets)`` batches (eval mode)."""
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    try:
        for i, (x, y) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            nll += _nll(logits_of(model, x).float(), y)
            n += y.numel()
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("perplexity got no batches")
    return math.exp(nll / n)


@torch.no_grad()
def verify_lm_artifacts(
    model: nn.Module,
    artifacts: Mapping[str, str | Path],
    batches: Iterable[Any],
    max_batches: int | None = None,
    threads: int = 2,
    llama_cpp: bool = True,
) -> dict[str, Any]:
    """Run the fake-quant model and every artifact on ``batches`` of ``(ids, targets)``.

    Args:
        model: the fake-quant model that was exported (run in eval mode on a CPU copy).
        artifacts: runtime name → file (``onnx``, ``gguf``; keys starting with those).
        batches: ``(ids (B, T), targets (B, T))`` long tensors.
        max_batches: stop after this many batches.
        threads: ONNX Runtime intra-op threads.
        llama_cpp: also run each GGUF file in real llama.cpp where ``llama-cpp-python`` is
            installed (:func:`with_llama_cpp`); False: the PyTorch runner only.

    Returns:
        The report described in the module docstring.
    """
    ref_model = copy.deepcopy(model).cpu().eval()
    if llama_cpp:
        artifacts = with_llama_cpp(artifacts)
    runtimes = {name: load_lm_runtime(name, path, threads) for name, path in artifacts.items()}
    exact = {name for name, path in artifacts.items() if _exact_onnx(name, path)}
    totals = ("nll", "ref_nll", "kl", "tie", "max", "sum")
    stats = {n: {"agree": 0, "count": 0} | dict.fromkeys(totals, 0.0) for n in runtimes}
    ref_nll, tokens = 0.0, 0
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        # (logits, nll) of the plain evaluation, and of the one as ONNX Runtime computes.
        plain = logits_of(ref_model, x).float()
        refs = {False: (plain, _nll(plain, y))}
        if exact:
            with runtime_numerics(ref_model, target="onnx"):
                as_runtime = logits_of(ref_model, x).float()
            refs[True] = (as_runtime, _nll(as_runtime, y))
        ref_nll += refs[False][1]
        tokens += y.numel()
        for name, run in runtimes.items():
            ref, nll = refs[name in exact]
            top = ref.argmax(-1)
            s = stats[name]
            s["ref_nll"] += nll
            out = run(x)
            if out.shape != ref.shape:
                raise ParityError(
                    f"{name}: logits of shape {tuple(out.shape)}, the fake-quant model's are "
                    f"{tuple(ref.shape)}"
                )
            diff = (out - ref).abs()
            s["agree"] += int((out.argmax(-1) == top).sum())
            s["nll"] += _nll(out, y)
            s["kl"] += _kl_sum(ref, out)
            s["tie"] = max(s["tie"], _tie_margin(ref, out))
            s["max"] = max(s["max"], float(diff.max()))
            s["sum"] += float(diff.double().sum())
            s["count"] += diff.numel()
    if tokens == 0:
        raise ValueError("verify_lm_artifacts got no batches")
    ppl = math.exp(ref_nll / tokens)
    report: dict[str, Any] = {"num_tokens": tokens, "fake_quant": {"perplexity": ppl}}
    report["runtimes"] = {}
    for name, s in stats.items():
        out_ppl, ref_ppl = math.exp(s["nll"] / tokens), math.exp(s["ref_nll"] / tokens)
        report["runtimes"][name] = {
            "agreement": s["agree"] / tokens,
            "perplexity": out_ppl,
            "reference_perplexity": ref_ppl,  # the fake-quant model's, as this runtime computes
            "ppl_rel_diff": abs(out_ppl - ref_ppl) / ref_ppl,
            "mean_kl": s["kl"] / tokens,  # nats per position: KL(fake-quant ‖ runtime)
            "tie_margin": s["tie"],  # nats: the widest fake-quant margin a disagreement crossed
            "max_abs_diff": s["max"],
            "mean_abs_diff": s["sum"] / max(s["count"], 1),
        }
    return report


#: The contract an exported language model meets on any CPU (module docstring).
DEFAULT_MIN_AGREEMENT = 0.999
DEFAULT_MAX_PPL_REL_DIFF = 0.001
# Measured on AVX2 (docs/design.md): the default (float32-island) ONNX files of a well-trained
# gpt 1.1e-5 (lm_w8da8) and 1.8e-5 nats (lm_q4_0); real llama.cpp on qat's Q4_0 GGUF files of the
# test families 1.0e-5 to 2.0e-5 with every top-1 agreeing. A 0.1% perplexity change needs ~1e-3
# nats: 1e-4 passes what agrees and still catches a shifted distribution whose arg-max did not
# move.
DEFAULT_MAX_KL = 1e-4


def check_lm_parity(
    report: Mapping[str, Any],
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    max_ppl_rel_diff: float = DEFAULT_MAX_PPL_REL_DIFF,
    max_kl: float = DEFAULT_MAX_KL,
) -> None:
    """Raise :class:`~qat.export.ParityError` if a runtime misses the targets.

    Args:
        report: :func:`verify_lm_artifacts`' report.
        min_agreement: least top-1 next-token agreement (fraction).
        max_ppl_rel_diff: largest relative perplexity difference (0.001: 0.1%).
        max_kl: largest mean KL divergence of the next-token distributions (nats per
            position, ``KL(fake-quant ‖ runtime)``). Reports without ``mean_kl`` (from before
            it) are not checked on it.
    """
    limits = (
        ("min_agreement", min_agreement),
        ("max_ppl_rel_diff", max_ppl_rel_diff),
        ("max_kl", max_kl),
    )
    for name, value in limits:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ValueError(f"{name}={value!r} is invalid: expected a number in [0, 1]")
    failures = []
    for name, r in report.get("runtimes", {}).items():
        if not r["agreement"] >= min_agreement:
            tie = r.get("tie_margin")
            ties = "" if tie is None else f" (the model's margin there at most {tie:.3g} nats)"
            failures.append(
                f"{name}: next-token agreement {r['agreement']:.4%} < {min_agreement:.4%}{ties}"
            )
        if not r["ppl_rel_diff"] <= max_ppl_rel_diff:
            failures.append(
                f"{name}: perplexity {r['perplexity']:.4f} differs by {r['ppl_rel_diff']:.3%} "
                f"from the fake-quant model's (allowed {max_ppl_rel_diff:.3%})"
            )
        kl = r.get("mean_kl")
        if kl is not None and not kl <= max_kl:
            failures.append(
                f"{name}: mean KL divergence of the next-token distributions {kl:.3g} nats "
                f"> {max_kl:.3g}"
            )
    if failures:
        raise ParityError(
            f"exported language model(s) disagree with the fake-quant model on "
            f"{report.get('num_tokens')} tokens: " + "; ".join(failures)
        )
