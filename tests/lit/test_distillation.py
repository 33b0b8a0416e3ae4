"""ClassifierModule's distillation term: the loss, and a teacher that stays out of the way."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.lit.classifier import ClassifierModule


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)
    )


def test_training_loss_mixes_cross_entropy_and_the_teachers_soft_targets() -> None:
    student, teacher = _net(0), _net(1)
    teacher_before = copy.deepcopy(teacher.state_dict())
    module = ClassifierModule(
        student,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=3,
        teacher=teacher,
        distill_weight=0.25,
        distill_temperature=3.0,
    )
    module.log = lambda *a, **k: None  # no Trainer: logging is not under test here
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    module.train()
    loss = module.training_step((x, y), 0)

    with torch.no_grad():  # student in train mode as in the step: the same batch statistics
        logits, target = student(x), teacher(x)
    t = 3.0
    kl = F.softmax(target / t, 1) * (F.log_softmax(target / t, 1) - F.log_softmax(logits / t, 1))
    expected = 0.75 * F.cross_entropy(logits, y) + 0.25 * t * t * kl.sum(1).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)

    # The teacher is not part of the module: not in its state_dict (checkpoints), parameters
    # (optimizer) or children (.train()), and a training step leaves it as it was, in eval mode.
    assert all(
        k.startswith(("model.", "train_acc", "val_acc", "test_acc")) for k in module.state_dict()
    )
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in module.parameters()}
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_no_teacher_no_distillation_and_bad_values_are_refused() -> None:
    module = ClassifierModule(_net(0), num_classes=3, teacher=_net(1), distill_weight=0.0)
    assert module._teacher == ()  # weight 0: the teacher is not even kept
    with pytest.raises(ValueError, match=r"distill_weight=1.5 is invalid: a weight in \[0, 1\]"):
        ClassifierModule(_net(0), num_classes=3, teacher=_net(1), distill_weight=1.5)
    with pytest.raises(ValueError, match="distill_temperature=0 is invalid"):
        ClassifierModule(
            _net(0), num_classes=3, teacher=_net(1), distill_weight=0.5, distill_temperature=0
        )
    with pytest.raises(ValueError, match="needs a teacher network"):
        ClassifierModule(_net(0), num_classes=3, distill_weight=0.5)
