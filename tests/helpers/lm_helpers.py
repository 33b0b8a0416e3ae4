"""Helpers for the language-model tests: the real quant presets, stdlib text, a tiny trained GPT.

The float model trains once per test session (a few seconds): trained logits have margins
between their top tokens, as a deployed model's do, where an untrained model's are near-ties.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import qat

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SEQ = 64


@lru_cache
def lm_recipe(name: str) -> dict[str, Any]:
    """The recipe of ``configs/quant/<name>.yaml`` (composed by Hydra, as a run does)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"quant={name}"])
    data = OmegaConf.to_container(cfg.quant, resolve=True)
    return {k: v for k, v in data.items() if k not in ("enabled", "bits", "name")}


def w8da8_per_tensor() -> dict[str, Any]:
    """``lm_w8da8`` with per-tensor dynamic uint8 activations (``DynamicQuantizeLinear``'s grid,
    exported as ``DynamicQuantizeMatMul``) instead of the preset's per-token int8."""
    rec = copy.deepcopy(lm_recipe("lm_w8da8"))  # the cached recipe stays the preset's
    rec["activation"].update(dynamic="tensor", signed=False, symmetric=False)
    return rec


def fake_quant_hf(path: str | Path, recipe: str | dict, steps: int = 2) -> nn.Module:
    """The Hugging Face model of ``path`` prepared with ``recipe``, calibrated on random ids and
    trained ``steps`` AdamW steps (the scales move), in eval mode."""
    import warnings

    from qat.export.lm_io import logits_of
    from qat.models.hf import load_hf_causal_lm

    torch.manual_seed(0)
    model = load_hf_causal_lm(str(path))
    ids = torch.randint(0, 512, (4, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the module-swap fallback warning
        rec = lm_recipe(recipe) if isinstance(recipe, str) else recipe
        qmodel = qat.prepare(model, rec, example_inputs=ids[:2])
    qat.calibrate(qmodel, [ids], num_batches=1)
    opt = torch.optim.AdamW(qmodel.parameters(), lr=1e-3)
    qmodel.train()
    for _ in range(steps):
        logits = logits_of(qmodel, ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qmodel.eval()


@lru_cache
def text_data(seq_len: int = SEQ, batch_size: int = 16) -> Any:
    from qat.data import TextDataModule

    dm = TextDataModule(
        seq_len=seq_len,
        batch_size=batch_size,
        max_bytes=600_000,
        val_bytes=20_000,
        test_bytes=40_000,
    )
    dm.setup()
    return dm


def lm_test_batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = text_data().test_dataloader()
    return [b for _, b in zip(range(n), loader, strict=False)]


def train_steps(model: nn.Module, steps: int, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loader = text_data().train_dataloader()
    it = iter(loader)
    for _ in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@lru_cache
def _float_gpt() -> nn.Module:
    from qat.models import create_model

    torch.manual_seed(0)
    model = create_model("gpt", d_model=64, n_layers=2, n_heads=2, context_length=SEQ)
    return train_steps(model, 250)


def float_gpt() -> nn.Module:
    """A tiny byte-level GPT (d 64, 2 blocks) trained 250 steps on stdlib text (a copy)."""
    return copy.deepcopy(_float_gpt())


def qat_gpt(recipe: str | dict, steps: int = 20) -> nn.Module:
    """The float GPT prepared with ``recipe`` (a preset name or a dict), its weight ranges
    observed, then ``steps`` QAT steps; returned in eval mode."""
    rec = lm_recipe(recipe) if isinstance(recipe, str) else recipe
    x = lm_test_batches(1)[0][0]
    model = qat.prepare(float_gpt(), rec, example_inputs=x[:2])
    model.train()
    with torch.no_grad():
        model(x)  # observe every quantizer once (weights; dynamic ones need none)
    if steps:
        train_steps(model, steps, lr=1e-3, seed=1)
    return model.eval()
