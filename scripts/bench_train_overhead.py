"""QAT training-step overhead: float vs W8A8 vs W4A4-LSQ vs torch.ao FX QAT (the peer).

One training step (forward, backward, SGD update) of a CIFAR-style ResNet-20 at batch 128, every
variant measured side by side in one process, interleaved round by round so machine noise hits
them alike; prints the median step time and the ratio to the float step. Goal: W8A8 ≤ 1.2x.

    python scripts/bench_train_overhead.py [--rounds 15] [--batch-size 128] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

import qat
from qat.models import create_model

GOAL_W8A8 = 1.2


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def qat_model(base: nn.Module, recipe: dict, x: torch.Tensor) -> nn.Module:
    model = qat.prepare(copy.deepcopy(base), recipe)
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
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base = create_model("resnet20", num_classes=10, in_channels=3, image_size=32)
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    variants: dict[str, nn.Module] = {
        "float": copy.deepcopy(base),
        "qat W8A8": qat_model(base, {}, x),
        "qat W4A4-LSQ": qat_model(
            base,
            {
                "weight": {"bits": 4, "learned": "lsq"},
                "activation": {"bits": 4, "learned": "lsq"},
                "overrides": [
                    {"pattern": p, "weight": {"bits": 8}, "activation": {"bits": 8}}
                    for p in ("stem.0", "fc")
                ],
            },
            x,
        ),
    }
    peer = torch_ao_fx_model(base, x)
    if peer is not None:
        variants["torch.ao FX QAT (W8A8)"] = peer

    steps = {name: make_step(model, x, y) for name, model in variants.items()}
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
        f"ResNet-20, batch {args.batch_size}, 3x32x32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds"
    )
    print(f"{'variant':<26}{'step ms':>10}{'vs float':>10}")
    for name, t in med.items():
        print(f"{name:<26}{t * 1e3:>10.1f}{t / med['float']:>9.2f}x")
    ratio = med["qat W8A8"] / med["float"]
    verdict = "meets" if ratio <= GOAL_W8A8 else "misses"
    print(f"W8A8 / float = {ratio:.2f}x ({verdict} the goal of ≤ {GOAL_W8A8}x)")


if __name__ == "__main__":
    main()
