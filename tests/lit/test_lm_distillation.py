"""LanguageModelModule's distillation from the frozen float model (QAD): the loss per token,
and a teacher that stays out of checkpoints, the optimizer and training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from qat.lit.lm import LanguageModelModule
from qat.models import create_model


def _gpt(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("gpt", vocab_size=32, context_length=16, d_model=32, n_layers=1, n_heads=2)


def test_loss_mixes_cross_entropy_and_the_per_token_kl_to_the_teacher() -> None:
    student, teacher = _gpt(0), _gpt(1)
    before = copy.deepcopy(teacher.state_dict())
    module = LanguageModelModule(
        student, teacher=teacher, distill_weight=0.3, distill_temperature=2.0
    )
    module.log = lambda *a, **k: None  # no Trainer: logging is not under test here
    ids, targets = torch.randint(0, 32, (3, 16)), torch.randint(0, 32, (3, 16))
    module.train()
    loss = module.training_step((ids, targets), 0)
    with torch.no_grad():
        s, t = student(ids).flatten(0, 1), teacher(ids).flatten(0, 1)
    kl = F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))
    expected = 0.7 * F.cross_entropy(s, targets.flatten()) + 0.3 * 4 * kl.sum(-1).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert all(not k.startswith("_teacher") for k in module.state_dict())
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in module.parameters()}
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"distill_weight": 1.5, "teacher": None}, r"distill_weight=1.5 is invalid"),
        ({"distill_weight": 0.5, "teacher": None}, r"needs a teacher"),
        ({"distill_weight": 0.5, "distill_temperature": 0.0}, r"temperature > 0"),
    ],
)
def test_bad_distillation_options(kwargs: dict, match: str) -> None:
    kwargs = {"teacher": _gpt(1), **kwargs}
    with pytest.raises(ValueError, match=match):
        LanguageModelModule(_gpt(0), **kwargs)
