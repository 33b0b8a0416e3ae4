"""``QATCallback``: quantization-aware training around an ordinary ``LightningModule``.

``setup()`` prepares ``pl_module.model`` (:func:`qat.prepare`: before ``configure_optimizers``
and the checkpoint restore, so learned ranges reach the optimizer and a checkpoint's quantizer
state loads); each training epoch applies the :class:`qat.Schedule` (warm-up, calibration,
weights / activations on, annealing, BN and observer freezes); BN statistics are re-estimated
before each validation and the BN freeze; the loss is watched around each schedule step
(:mod:`qat.lit.divergence`); grid biases are linked; bit widths and per-layer statistics are
logged; a non-finite loss stops the run naming where it started; the ``state_dict`` holds the
recipe and the schedule position, so a resume continues exactly. Under DDP every rank runs the
same schedule and observer statistics are all-reduced, so quantizer state stays identical.
docs/design.md ("The QAT callback") says why each piece is there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn

from qat.lit.calibration import (
    activations_quantized,
    calibrate_on_training_data,
    link_bias_on_batch,
    reestimate_bn_on_training_data,
)
from qat.lit.divergence import (
    DivergenceError,
    DivergenceGuard,
    Snapshot,
    check_finite_loss,
    describe_steps,
    divergence_message,
)
from qat.quant.control import anneal_bits, is_prepared, iter_quantizers, uninitialized_quantizers
from qat.quant.diagnostics import flatten_stats, quantization_stats
from qat.quant.distributed import first_bad_rank
from qat.quant.layers import QConvBn2d
from qat.quant.prepare import prepare
from qat.quant.schedule import ROLES, Phase, Schedule
from qat.quant.spec import Recipe

__all__ = ["QATCallback"]

#: Float width reported for a role whose fake quantization is off.
FLOAT_BITS = 32
_STATE_VERSION = 1


class QATCallback(Callback):
    """Quantization-aware training for ``pl_module.<attr>`` (see the module docstring).

    Args:
        recipe: a :class:`qat.Recipe` or a mapping for ``Recipe.from_dict``.
        schedule: a :class:`qat.Schedule` or a mapping for ``Schedule.from_dict``.
        attr: name of the LightningModule attribute holding the network.
        layer_stats: log per-layer scale / clipping rate / SQNR once per epoch.
        stats_samples: samples of the epoch's first training batch used for those statistics.
        calibration_seed: seed of the calibration batches' shuffle (same batches on every rank).

    Attributes:
        history: one row per finished training epoch (phase, bit widths, val metrics).
        layer_stats: the last per-layer statistics, ``{quantizer name: {sqnr_db, ...}}``.
    """

    def __init__(
        self,
        recipe: Recipe | Mapping[str, Any],
        schedule: Schedule | Mapping[str, Any] | None = None,
        attr: str = "model",
        layer_stats: bool = True,
        stats_samples: int = 64,
        calibration_seed: int = 0,
    ) -> None:
        super().__init__()
        self.recipe = Recipe.from_dict(recipe)
        self.schedule = Schedule.from_dict(schedule)
        self.attr = attr
        self.log_layer_stats = layer_stats
        self.stats_samples = stats_samples
        self.calibration_seed = calibration_seed
        self.calibrated = False
        self.history: list[dict[str, Any]] = []
        self.layer_stats: dict[str, dict[str, float]] = {}
        self._bits: dict[str, int | None] = {}
        self._phase: Phase | None = None
        self._epoch: int | None = None
        self._targets: dict[str, int | None] = {}
        self._stats_batch: torch.Tensor | None = None
        self._batch: tuple[int, int, torch.Tensor | None] | None = None
        self._restored: dict[str, Any] | None = None
        self._bn_reestimated_at: int | None = None  # global step of the last re-estimation
        self._bias_linked_epoch: int | None = None
        self._guard = DivergenceGuard(
            self.schedule.divergence_factor, self.schedule.divergence_window
        )

    # ------------------------------------------------------------------ helpers
    def _model(self, pl_module: LightningModule) -> nn.Module:
        model = getattr(pl_module, self.attr, None)
        if not isinstance(model, nn.Module):
            raise AttributeError(
                f"QATCallback(attr={self.attr!r}): the LightningModule has no nn.Module "
                f"attribute {self.attr!r}; pass the attribute that holds the network"
            )
        return model

    @staticmethod
    def _lowest_target(model: nn.Module, role: str) -> int | None:
        bits = [q.spec.bits for _, q in iter_quantizers(model, role) if q.spec.enabled]
        return min(bits) if bits else None

    def current_bits(self, role: str) -> int:
        """Bit width the schedule has set for ``role`` (32 while its fake quantization is off)."""
        on = self._phase is not None and (
            self._phase.weights_on if role == "weight" else self._phase.acts_on
        )
        bits = self._bits.get(role)
        return bits if on and bits is not None else FLOAT_BITS

    def report(self) -> dict[str, Any]:
        """What the run's ``results.json`` records of quantization: history, bits, layer stats."""
        return {
            "history": list(self.history),
            "weight_bits": self.current_bits("weight"),
            "act_bits": self.current_bits("activation"),
            "layer_stats": self.layer_stats,
        }

    def quantize_untrained(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Put a model whose training ended before quantization started into its final state.

        Post-training quantization (``trainer.max_epochs=0``, or a schedule that never reached
        its quantized phase): the schedule's last state is applied (ranges calibrated, bit
        widths at their targets) and observers stay off, so ranges stay where calibration
        put them. Returns False (and changes nothing) when quantization had started.
        """
        if self.calibrated:
            return False
        with isolate_rng():
            self.apply_schedule(trainer, pl_module, self.schedule.end_epoch())
        for _, q in iter_quantizers(self._model(pl_module)):
            q.enable_observer(False)
        return True

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        model = self._model(pl_module)
        if is_prepared(model):
            recipe = getattr(model, "qat_recipe", None)
            if recipe is not None and Recipe.from_dict(recipe).to_dict() != self.recipe.to_dict():
                raise ValueError(
                    "the model is already prepared with another recipe than QATCallback's: "
                    f"{model.qat_recipe} vs {self.recipe.to_dict()}"
                )
        else:
            # The LightningModule's example batch (Lightning's own convention) lets the graph
            # capture tell float inputs from integer ones and check the graph.
            example = getattr(pl_module, "example_input_array", None)
            prepare(model, self.recipe, inplace=True, example_inputs=example)
            # Float until the schedule says otherwise: nothing has a range yet. A checkpoint
            # restored after this hook brings back its own flags (they are buffers).
            for _, q in iter_quantizers(model):
                q.enable_fake_quant(False)
                q.enable_observer(False)
        self._targets = {role: self._lowest_target(model, role) for role in ROLES}

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        self._bits = {}  # re-read the quantizers: a checkpoint may have set them
        steps = self._guard.pending(self.schedule.steps_at(epoch, self._targets))
        rollback = steps and self.schedule.on_divergence == "rollback"
        snapshot = Snapshot.take(self._model(pl_module), trainer) if rollback else None
        self.apply_schedule(trainer, pl_module, epoch)
        self._guard.arm(steps, epoch, snapshot)
        if self._restored is not None:
            self._check_restored(epoch)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        mean = self._guard.observe(float(loss.detach()))
        if mean is None:
            return
        # Collective: under DDP every rank rolls back (or stops) at the same batch, or none.
        bad_rank = first_bad_rank(self._guard.jumped(mean), loss.device)
        if bad_rank is not None:
            self._diverged(trainer, pl_module, mean)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Only fit's own validations: sanity checks, trainer.validate() and trainer.test()
        # evaluate the model as it is.
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self._phase is not None and self._phase.quantized:
            self._reestimate_bn(trainer, self._model(pl_module))

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        # A reference only: it is what locate_non_finite() replays if this step's loss is NaN.
        self._batch = (trainer.current_epoch, batch_idx, x if isinstance(x, torch.Tensor) else None)
        if batch_idx == 0 and self.log_layer_stats and isinstance(x, torch.Tensor):
            self._stats_batch = x[: self.stats_samples].detach()
        if self._phase is None or not self._phase.quantized:
            return
        if self.recipe.quantize_bias and self._bias_linked_epoch != trainer.current_epoch:
            self._link_bias(pl_module, x)
            self._bias_linked_epoch = trainer.current_epoch
        if self.schedule.steps_within_epoch():
            total = trainer.num_training_batches
            fraction = batch_idx / total if isinstance(total, int) and total > 0 else 0.0
            self._set_bits(self._model(pl_module), trainer.current_epoch, fraction)

    def on_validation_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._link_bias_for_evaluation(pl_module, batch)

    # Whichever evaluation comes first in the process links the grid biases.
    on_test_batch_start = on_validation_batch_start
    on_predict_batch_start = on_validation_batch_start

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor
    ) -> None:
        # Before backward and the optimizer step: a NaN loss would otherwise spread NaN through
        # every parameter, and the layer where it started could no longer be told apart.
        if trainer.training:
            phase = self._phase.name if self._phase else "float"
            check_finite_loss(trainer, loss, self._model(pl_module), self._batch, phase)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._guard.disarm()
        wbits, abits = self.current_bits("weight"), self.current_bits("activation")
        # Same value on every rank; sync_dist only keeps Lightning's DDP epoch-logging contract.
        for key, value in (("quant/weight_bits", wbits), ("quant/act_bits", abits)):
            pl_module.log(key, float(value), on_step=False, on_epoch=True, sync_dist=True)
        row: dict[str, Any] = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "phase": self._phase.name if self._phase else "float",
            "weight_bits": wbits,
            "act_bits": abits,
        }
        for key in ("val/acc", "val/loss", "train/acc"):
            value = trainer.callback_metrics.get(key)
            if value is not None:
                row[key] = float(value)
        self.history.append(row)
        quantized = self._phase is not None and self._phase.quantized
        if self.log_layer_stats and quantized and self._stats_batch is not None:
            model = self._model(pl_module)
            x = self._stats_batch
            if getattr(pl_module, "channels_last", False) and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with isolate_rng():
                self.layer_stats = quantization_stats(model, x)
            # Computed on rank 0 only would work too; every rank has the same model, and
            # rank_zero_only keeps DDP from expecting a synced value.
            pl_module.log_dict(
                flatten_stats(self.layer_stats), on_step=False, on_epoch=True, rank_zero_only=True
            )
        self._stats_batch = None
        self._batch = None

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "recipe": self.recipe.to_dict(),
            "schedule": self.schedule.to_dict(),
            "calibrated": self.calibrated,
            "epoch": self._epoch,
            "phase": self._phase.name if self._phase else None,
            "weight_bits": self.current_bits("weight"),
            "act_bits": self.current_bits("activation"),
            "bn_frozen": bool(self._phase and self._phase.bn_frozen),
            # A resume at a BN freeze must not re-estimate what this step already did.
            "bn_reestimated_at": self._bn_reestimated_at,
            "history": list(self.history),
            "skipped_steps": dict(self._guard.skipped),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        recipe = state_dict.get("recipe")
        # Through Recipe: a checkpoint from before a field existed holds its default.
        if recipe is not None and Recipe.from_dict(recipe).to_dict() != self.recipe.to_dict():
            raise ValueError(
                "the checkpoint was trained with another quantization recipe than the config's; "
                f"checkpoint: {recipe}; config: {self.recipe.to_dict()}. Resume with the run's "
                "own config (its .hydra/config.yaml)."
            )
        schedule = state_dict.get("schedule")
        # Through Schedule too: a checkpoint from before a field existed holds its default.
        if schedule is not None and Schedule.from_dict(schedule) != self.schedule:
            rank_zero_warn(
                "resuming with a different QAT schedule than the checkpoint's; the schedule "
                "continues from the current epoch with the new settings"
            )
        self.calibrated = bool(state_dict.get("calibrated", False))
        self.history = list(state_dict.get("history", []))
        self._bn_reestimated_at = state_dict.get("bn_reestimated_at")
        self._guard.skipped = dict(state_dict.get("skipped_steps") or {})
        self._restored = dict(state_dict)

    def _check_restored(self, epoch: int) -> None:
        state, self._restored = self._restored, None
        assert state is not None
        if state.get("epoch") is not None and epoch > state["epoch"]:
            rank_zero_info(
                f"QAT resumed at epoch {epoch} (checkpoint: epoch {state['epoch']}, phase "
                f"{state['phase']}, bits w{state['weight_bits']}/a{state['act_bits']}); "
                f"now: phase {self._phase.name if self._phase else None}, bits "
                f"w{self.current_bits('weight')}/a{self.current_bits('activation')}"
            )

    # ------------------------------------------------------------------ the schedule
    def apply_schedule(
        self, trainer: Trainer | None, pl_module: LightningModule, epoch: int, fraction: float = 0.0
    ) -> Phase:
        """Put the model in the state the schedule gives for ``epoch`` (+ ``fraction``).

        Idempotent: applying the same epoch twice changes nothing; calibration runs once, when
        quantization first starts (not again after a resume: the ranges are in the checkpoint).
        """
        model = self._model(pl_module)
        phase = self._guard.adjust(self.schedule.phase(epoch))  # rolled-back steps stay undone
        self._phase, self._epoch = phase, epoch
        if phase.quantized:
            # Bits first, so calibrated scales are computed on the grid they will be used with.
            self._set_bits(model, epoch, fraction)
            if not self.calibrated:
                if uninitialized_quantizers(model):
                    self._calibrate(trainer, model)
                self.calibrated = True
        for _, q in iter_quantizers(model):
            role_on = phase.weights_on if q.role == "weight" else phase.acts_on
            q.enable_fake_quant(role_on)
            if not phase.quantized:
                observe = False
            elif phase.observers_frozen and not (q.role == "weight" and q.learned == "none"):
                # An observed weight range is a function of the weights alone, so it keeps
                # following them: frozen, it clipped the folded weights as they trained on
                # (MobileNetV2 W2A2's 8-bit stem: 10% of its weights, up to 2.5x; SQNR 41 → 5 dB).
                observe = False
            elif q.learned != "none":
                # Learned ranges are trained, not observed; until the role is switched on they
                # keep tracking the data so they start from a current range.
                observe = not role_on
            else:
                observe = True
            q.enable_observer(observe)
        if phase.bn_frozen and phase.quantized:
            # Frozen statistics are used from now on: make them the current network's.
            self._reestimate_bn(trainer, model)
        for m in model.modules():
            if isinstance(m, QConvBn2d):
                m.freeze_bn_stats(phase.bn_frozen)
        return phase

    def _set_bits(self, model: nn.Module, epoch: int, fraction: float) -> None:
        for role in ROLES:
            target = self._targets.get(role)
            if target is None:
                continue
            bits = self._guard.held_bits(role, self.schedule.bits(role, target, epoch, fraction))
            if self._bits.get(role) != bits:
                anneal_bits(model, bits, role)
                self._bits[role] = bits

    def _diverged(self, trainer: Trainer, pl_module: LightningModule, mean: float) -> None:
        guard, action = self._guard, self.schedule.on_divergence
        model = self._model(pl_module)
        what = describe_steps(guard.steps)
        with isolate_rng():
            x = self._batch[2] if self._batch else None  # this batch, as the loss saw it
            message = divergence_message(
                guard, mean, model, x[: self.stats_samples] if x is not None else None
            )
        if action == "stop":
            raise DivergenceError(
                message + "; schedule.on_divergence=rollback skips the step instead, or lower "
                "the learning rate"
            )
        if action == "rollback" and guard.snapshot is not None:
            guard.snapshot.restore(model, trainer)
            guard.skip()
            self._bits = {}
            self.apply_schedule(trainer, pl_module, guard.epoch)
            message += f"; rolled back to before the step, and {what} is skipped from now on"
        else:
            message += " (schedule.on_divergence=rollback undoes such a step)"
        rank_zero_warn(message)
        guard.disarm()

    def _link_bias_for_evaluation(self, pl_module: LightningModule, batch: Any) -> None:
        # An evaluation before any training batch of this process (a checkpoint's test, a
        # resumed run's sanity check) has no links: they are references, not state, and the
        # forward would add the float bias, not the grid bias it trained with (a MobileNetV2
        # W2A2 checkpoint: 42% validation accuracy, 71% with the grid bias).
        if not self.recipe.quantize_bias or self._bias_linked_epoch is not None:
            return
        model = self._model(pl_module)
        if activations_quantized(model):  # else a quantized training epoch links when it starts
            self._link_bias(pl_module, batch[0] if isinstance(batch, list | tuple) else batch)
            self._bias_linked_epoch = -1  # before any training epoch: the first one links again

    def _link_bias(self, pl_module: LightningModule, x: Any) -> None:
        # Each quantized epoch: the schedule may have switched input quantizers on since.
        link_bias_on_batch(self._model(pl_module), x, self.stats_samples)

    def _calibrate(self, trainer: Trainer | None, model: nn.Module) -> None:
        calibrate_on_training_data(
            trainer, model, self.schedule.calibration_batches, self.calibration_seed
        )

    def _reestimate_bn(self, trainer: Trainer | None, model: nn.Module) -> None:
        step = trainer.global_step if trainer is not None else None
        if step is not None and step == self._bn_reestimated_at:
            return  # done already since the last optimizer step
        # Other batches each time (a fixed function of the step, so a resume draws the same).
        seed = self.calibration_seed + 1 + (step or 0)
        if reestimate_bn_on_training_data(
            trainer,
            model,
            self.schedule.bn_reestimate_batches,
            seed,
            announce=self._bn_reestimated_at is None,  # said once a run, not every validation
        ):
            self._bn_reestimated_at = step
