"""Split norm + activation modules (timm's ``BatchNormAct2d``) into a plain norm and its act.

timm writes "BN then activation" as one module, a ``BatchNorm2d`` subclass holding ``drop`` and
``act`` children, so that checkpoints keep BatchNorm's parameter names. Traced as it is, its
forward becomes a functional ``F.batch_norm`` on the BN's parameters: no conv → BN fold, and a
float island between integer layers. :func:`split_norm_act` replaces each such module by an
``nn.Sequential`` of a plain ``nn.BatchNorm2d`` (the same parameter and buffer tensors), its
``drop`` (unless an identity) and its ``act``, which computes the same and which the graph rewrite folds like any
conv → BN (→ ReLU). Duck-typed: a ``BatchNorm2d`` subclass whose extra children are
``drop`` / ``act`` and that adds no parameters of its own.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["split_norm_act"]

_PARTS = ("drop", "act")


def _is_norm_act(m: nn.Module) -> bool:
    if type(m) is nn.BatchNorm2d or not isinstance(m, nn.BatchNorm2d):
        return False
    children = dict(m.named_children())
    own = {n for n, _ in m.named_parameters(recurse=False)} - {"weight", "bias"}
    return bool(children) and set(children) <= set(_PARTS) and not own


def _plain(m: nn.BatchNorm2d) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(
        m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, device="meta"
    )
    for name in ("weight", "bias"):
        setattr(bn, name, getattr(m, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(bn, name, getattr(m, name))
    bn.train(m.training)
    return bn


def split_norm_act(model: nn.Module) -> int:
    """Replace ``model``'s norm + activation modules in place (module docstring); the count."""
    found = [(name, m) for name, m in model.named_modules() if name and _is_norm_act(m)]
    for name, m in found:
        # An identity drop would stand between the BN and a ReLU the rewrite fuses.
        parts = [("bn", _plain(m))] + [
            (p, getattr(m, p))
            for p in _PARTS
            if hasattr(m, p) and type(getattr(m, p)) is not nn.Identity
        ]
        seq = nn.Sequential(OrderedDict(parts)).train(m.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, seq)
    return len(found)
