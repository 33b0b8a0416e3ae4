"""QAT training-step overhead: float vs qat's fake-quant models vs torch.ao FX QAT (the peer).

One training step (forward, backward, SGD update), every variant measured side by side in one
process, interleaved round by round so machine noise hits them alike; prints the median step
time and the ratio to the float step. Goal: W8A8 ≤ 1.2x the float step.

- ``--model resnet20`` (CIFAR-style, 3x32x32, batch 128): float, qat W8A8, qat W4A4-LSQ (first
  conv and classifier at 8 bits), torch.ao FX QAT W8A8;
- ``--model vit`` (the registry's ViT on 1x28x28, batch 128): float, W8A8, W4A4-LSQ;
- ``--model gpt`` (the registry's GPT, batch 32 x 128 tokens): float, W8A8 (``quant=w8a8``),
  ``lm_w8da8`` (int8 weights, dynamic int8 activations), ``lm_8da4w`` (int4 weights in groups
  of 32, dynamic per-token int8 activations) and ``lm_q4_0`` (GGUF Q4_0 / Q8_0);
- ``--compile``: also float and qat W8A8 under ``torch.compile`` (their ratio to the compiled
  float step is the one to read; the first steps compile).

    python scripts/bench_train_overhead.py [--model resnet20|vit|gpt] [--compile] [--rounds 15]
        [--batch-size N] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_llm's preset_recipe

import qat
from qat.models import create_model

GOAL_W8A8 = 1.2


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, forward=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    forward = model if forward is None else forward

    def step() -> None:
        logits = forward(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


LSQ_W4A4 = {
    "weight": {"bits": 4, "learned": "lsq"},
    "activation": {"bits": 4, "learned": "lsq"},
    "overrides": [
        {"pattern": "@first", "weight": {"bits": 8}, "activation": {"bits": 8}},
        {"pattern": "@last", "weight": {"bits": 8}, "activation": {"bits": 8}},
    ],
}


def inputs(name: str, batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The float model, one input batch and its targets."""
    if name == "gpt":
        model = create_model("gpt")
        x = torch.randint(0, 256, (batch, 128))
        return model, x, torch.randint(0, 256, (batch, 128))
    if name == "vit":
        model = create_model("vit", num_classes=10, in_channels=1, image_size=28)
        return model, torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    model = create_model("resnet20", num_classes=10, in_channels=3, image_size=32)
    return model, torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))


def recipes(name: str) -> dict[str, dict]:
    if name != "gpt":
        return {"qat W8A8": {}, "qat W4A4-LSQ": LSQ_W4A4}
    from bench_llm import preset_recipe

    presets = {"qat W8A8": "w8a8", "qat lm_w8da8": "lm_w8da8", "qat lm_8da4w": "lm_8da4w"}
    presets["qat lm_q4_0"] = "lm_q4_0"
    return {label: preset_recipe(preset) for label, preset in presets.items()}


def qat_model(base: nn.Module, recipe: dict, x: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qat.prepare(copy.deepcopy(base), recipe, example_inputs=x[:2])
    qat.calibrate(model, [x])
    # Observers stay live for minmax/EMA ranges (the usual QAT setting); learned ranges don't observe.
    qat.set_observers(model, recipe.get("weight", {}).get("learned", "none") == "none")
    return model


def torch_ao_fx_model(base: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """torch.ao FX QAT with the x86 default QAT qconfig (deprecated upstream; peer only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import get_default_qat_qconfig_mapping
            from torch.ao.quantization.quantize_fx import prepare_qat_fx

            model = copy.deepcopy(base).train()
            return prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), (x,))
    except Exception as err:  # the peer is optional: report, don't fail the benchmark
        print(f"torch.ao FX QAT unavailable: {type(err).__name__}: {err}")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("resnet20", "vit", "gpt"), default="resnet20")
    parser.add_argument("--compile", action="store_true", help="also torch.compile'd variants")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=0, help="0: 128 (gpt: 32)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = args.batch_size or (32 if args.model == "gpt" else 128)

    base, x, y = inputs(args.model, batch)
    variants: dict[str, nn.Module] = {"float": copy.deepcopy(base)}
    for label, recipe in recipes(args.model).items():
        variants[label] = qat_model(base, recipe, x)
    if args.model == "resnet20":
        peer = torch_ao_fx_model(base, x)
        if peer is not None:
            variants["torch.ao FX QAT (W8A8)"] = peer
    forwards = {}
    if args.compile:
        for label in ("float", "qat W8A8"):
            model = copy.deepcopy(variants[label])
            variants[f"{label} (compiled)"] = model
            forwards[f"{label} (compiled)"] = torch.compile(model)

    steps = {name: make_step(m, x, y, forwards.get(name)) for name, m in variants.items()}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"{args.model}, batch {batch}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds"
    )
    print(f"{'variant':<26}{'step ms':>10}{'vs float':>10}")
    for name, t in med.items():
        print(f"{name:<26}{t * 1e3:>10.1f}{t / med['float']:>9.2f}x")
    ratio = med["qat W8A8"] / med["float"]
    verdict = "meets" if ratio <= GOAL_W8A8 else "misses"
    print(f"W8A8 / float = {ratio:.2f}x ({verdict} the goal of ≤ {GOAL_W8A8}x)")
    if args.compile:
        compiled = med["qat W8A8 (compiled)"] / med["float (compiled)"]
        print(f"compiled W8A8 / compiled float = {compiled:.2f}x")


if __name__ == "__main__":
    main()
