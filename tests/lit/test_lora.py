"""LoRA QAT: adapters inside the fake quantizer, the base frozen, merged bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from lm_helpers import lm_recipe

import qat
from qat.lit.lora import add_lora, lora_layers, merge_lora
from qat.models import create_model
from qat.quant.layers import QLinear


def _qgpt() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("gpt", vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=2)
    ids = torch.randint(0, 64, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = qat.prepare(model, lm_recipe("lm_w4g32"), example_inputs=ids)
    qat.calibrate(qmodel, [ids], num_batches=1)
    return qmodel


def test_adapters_train_through_the_quantizer_and_merge_exactly() -> None:
    qmodel = _qgpt()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = qmodel.eval()(ids)
    names = add_lora(qmodel, rank=4, alpha=8)
    linears = [n for n, m in qmodel.named_modules() if isinstance(m, QLinear)]
    assert names == linears[:-1] == lora_layers(qmodel)  # all but the output layer
    trainable = {n for n, p in qmodel.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "_quant." in n for n in trainable)
    with torch.no_grad():  # B = 0: the adapted model starts as the base model
        assert torch.equal(qmodel(ids), before)
    opt = torch.optim.AdamW([p for p in qmodel.parameters() if p.requires_grad], lr=1e-2)
    qmodel.train()
    for _ in range(3):
        loss = F.cross_entropy(qmodel(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer = qmodel.get_submodule(names[0])
    base = layer.parametrizations.weight.original.detach().clone()
    delta = layer.parametrizations.weight[0]
    assert delta.lora_B.abs().sum() > 0  # the adapters learned
    qmodel.eval()
    with torch.no_grad():
        adapted = qmodel(ids)
        expected_weight = base + delta.scale * (delta.lora_B @ delta.lora_A)
    assert not torch.equal(adapted, before)
    assert merge_lora(qmodel) == names and lora_layers(qmodel) == []
    assert torch.equal(layer.weight.detach(), expected_weight)
    with torch.no_grad():
        assert torch.equal(qmodel(ids), adapted)  # the merged model is the trained one
    assert all(p.requires_grad for p in qmodel.parameters())


def test_bad_lora_options() -> None:
    qmodel = _qgpt()
    with pytest.raises(ValueError, match=r"lora_rank=0 is invalid"):
        add_lora(qmodel, rank=0)
    with pytest.raises(ValueError, match=r"lora_targets=\['nothing\*'\] matches no"):
        add_lora(qmodel, rank=2, targets=["nothing*"])
