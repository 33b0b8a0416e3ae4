"""The Lightning + Hydra application: LightningModule, QAT callback, config validation, ``train``.

``train(cfg)`` (:mod:`qat.lit.train`) runs a composed config as a short list of named stages;
:class:`QATCallback` quantizes any LightningModule's network on a schedule; the config is
validated (:mod:`qat.lit.config`) before any work. Imports Lightning; ``import qat`` does not.
"""

from qat.lit.classifier import ClassifierModule
from qat.lit.divergence import DivergenceError
from qat.lit.epoch_seed import EpochSeed
from qat.lit.qat_callback import QATCallback

__all__ = ["ClassifierModule", "DivergenceError", "EpochSeed", "QATCallback"]
