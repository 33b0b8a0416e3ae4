"""QAT schedules: which quantizers are on, at which bit width, as pure functions of the epoch.

A run goes through these phases (each boundary is an epoch number; any may coincide)::

    epoch 0 ... warmup_epochs-1      float warm-up: every quantizer off
    warmup_epochs                    ranges calibrated on a few batches; weights fake-quantized
    act_start_epoch                  activations fake-quantized too
    weight_anneal / act_anneal       bit width goes from ``start_bits`` (8) to each layer's target
    freeze_bn_epoch                  BN statistics frozen (training on the folded graph);
                                     at least one epoch after the anneal reaches the target
    freeze_observer_epoch            observed activation ranges frozen (learned ranges keep
                                     learning; observed weight ranges keep following the weights)

While quantized with live BN, the BN running statistics are re-estimated on
``bn_reestimate_batches`` training batches before every validation and before the BN freeze
(:func:`qat.reestimate_bn`): at 2–3 bits the running averages of oscillating weights no longer
match the network they belong to.

Everything here is a pure function of ``(epoch, fraction of the epoch done)``, so a run resumed
from a checkpoint computes exactly the state the uninterrupted run had at that point.

A schedule longer than the run (``trainer.max_epochs=1`` on an experiment laid out for ten
epochs) is scaled onto it, as Lightning lays the learning-rate schedule out on the run's length:
:meth:`Schedule.fitted` (``fit_to_run: false`` keeps it as written).

Example:
    >>> s = Schedule.from_dict({"warmup_epochs": 1, "weight_anneal": {"epochs": 2}})
    >>> [s.bits("weight", target=4, epoch=e) for e in range(5)]
    [8, 6, 4, 4, 4]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qat.quant.spec import check_keys, to_plain

ANNEAL_MODES = ("step", "linear", "cosine")
DIVERGENCE_ACTIONS = ("warn", "rollback", "stop")
ROLES = ("weight", "activation")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"schedule.{name}={value!r} is invalid: {allowed}")


def _check_count(name: str, value: Any, minimum: int, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, value, allowed)


def _check_epoch(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    _check_count(
        name, value, 0, "expected an epoch number >= 0" + (" or null" if allow_none else "")
    )


@dataclass(frozen=True)
class Anneal:
    """How one role's bit width goes from ``start_bits`` down to its target.

    Args:
        mode: ``step`` (equal drops at epoch boundaries, reaching the target in the window's last
            epoch), ``linear`` or ``cosine`` (updated every training step, reaching the target at
            the end of the window; cosine moves slowly at both ends).
        start_epoch: first epoch of the annealing window; ``None`` means "when this role's fake
            quantization starts".
        epochs: length of the window; 0 jumps straight to the target.
        start_bits: bit width at the start (8: the widest integer grid).
    """

    mode: str = "step"
    start_epoch: int | None = None
    epochs: int = 0
    start_bits: int = 8

    def __post_init__(self) -> None:
        if self.mode not in ANNEAL_MODES:
            _fail("anneal.mode", self.mode, f"allowed: {', '.join(ANNEAL_MODES)}")
        _check_epoch("anneal.start_epoch", self.start_epoch, allow_none=True)
        _check_epoch("anneal.epochs", self.epochs)
        if (
            isinstance(self.start_bits, bool)
            or not isinstance(self.start_bits, int)
            or not 2 <= self.start_bits <= 8
        ):
            _fail("anneal.start_bits", self.start_bits, "expected an integer 2–8")

    def first_epoch(self, start: int) -> int:
        """The window's first epoch; ``start`` stands in when ``start_epoch`` is None."""
        return start if self.start_epoch is None else self.start_epoch

    def progress(self, epoch: int, fraction: float = 0.0, start: int = 0) -> float:
        """Fraction of the window done (0 before it, 1 after it) at ``epoch + fraction``.

        Args:
            epoch: current epoch.
            fraction: part of the current epoch done, in [0, 1) (ignored by ``step``).
            start: the window's start when ``start_epoch`` is None.
        """
        first = self.first_epoch(start)
        if self.epochs == 0:
            return 1.0 if epoch >= first else 0.0
        if self.mode == "step":
            # Epoch k of the window (0-based) is at (k + 1) / epochs: the last epoch of the
            # window trains at the target, so no bit width is seen for less than an epoch.
            done = (epoch - first + 1) / self.epochs
        else:
            done = (epoch + fraction - first) / self.epochs
        p = min(max(done, 0.0), 1.0)
        if self.mode == "cosine":
            p = 0.5 - 0.5 * math.cos(math.pi * p)
        return p

    def bits(self, target: int, epoch: int, fraction: float = 0.0, start: int = 0) -> int:
        """Bit width at ``epoch + fraction``, never below ``target``."""
        if target >= self.start_bits:
            return target
        p = self.progress(epoch, fraction, start)
        # Round half up (not to even), so equal-length windows drop one bit at a time evenly.
        value = math.floor(self.start_bits - (self.start_bits - target) * p + 0.5)
        return max(int(value), target)


@dataclass(frozen=True)
class Phase:
    """What is on at one point of the schedule."""

    weights_on: bool
    acts_on: bool
    bn_frozen: bool
    observers_frozen: bool

    @property
    def quantized(self) -> bool:
        return self.weights_on or self.acts_on

    @property
    def name(self) -> str:
        if not self.quantized:
            return "float"
        name = "w+a" if self.acts_on else "w"
        if self.bn_frozen:
            name += ",bn_frozen"
        if self.observers_frozen:
            name += ",obs_frozen"
        return name


@dataclass(frozen=True)
class Schedule:
    """The whole QAT schedule (see the module docstring for the phases).

    Args:
        warmup_epochs: float epochs before quantization starts (calibration happens right after).
        act_start_epoch: epoch activations are fake-quantized from (None: with the weights).
        weight_anneal: bit-width annealing of the weights.
        act_anneal: bit-width annealing of the activations.
        freeze_bn_epoch: epoch BN statistics freeze from (None: never).
        freeze_observer_epoch: epoch observed activation ranges freeze from (None: never).
            Observed weight ranges (min/max, MSE of the current weights) never freeze: a frozen
            one clips the weights as they keep training.
        calibration_batches: training batches used to calibrate ranges when quantization starts.
        bn_reestimate_batches: training batches BN statistics are re-estimated on before each
            validation and the BN freeze, while quantized (0: never; keep the running averages).
        on_divergence: what the training loop does when the loss jumps after a schedule step
            (a bit-width step, the BN or observer freeze): ``warn`` (say so, with the layer
            statistics), ``rollback`` (restore the model and optimizer from before the step
            and skip the step for the rest of the run) or ``stop`` (end the run with an error).
        divergence_factor: the jump: the mean loss of ``divergence_window`` batches after the
            step above this many times the mean of the last ``divergence_window`` before it
            (and at least 0.1 higher).
        divergence_window: batches each of those means is taken over.
        fit_to_run: scale the schedule's epochs onto a run too short for it
            (:meth:`fitted`); false: keep them, and the run may end before they are reached.
    """

    warmup_epochs: int = 0
    act_start_epoch: int | None = None
    weight_anneal: Anneal = field(default_factory=Anneal)
    act_anneal: Anneal = field(default_factory=Anneal)
    freeze_bn_epoch: int | None = None
    freeze_observer_epoch: int | None = None
    calibration_batches: int = 16
    bn_reestimate_batches: int = 32
    on_divergence: str = "warn"
    divergence_factor: float = 2.0
    divergence_window: int = 10
    fit_to_run: bool = True

    def __post_init__(self) -> None:
        _check_epoch("warmup_epochs", self.warmup_epochs)
        _check_epoch("act_start_epoch", self.act_start_epoch, allow_none=True)
        _check_epoch("freeze_bn_epoch", self.freeze_bn_epoch, allow_none=True)
        _check_epoch("freeze_observer_epoch", self.freeze_observer_epoch, allow_none=True)
        if self.act_start_epoch is not None and self.act_start_epoch < self.warmup_epochs:
            _fail(
                "act_start_epoch",
                self.act_start_epoch,
                f"activations cannot start before quantization does (warmup_epochs="
                f"{self.warmup_epochs}); use a value >= {self.warmup_epochs} or null",
            )
        for name in ("weight_anneal", "act_anneal"):
            if not isinstance(getattr(self, name), Anneal):
                raise ValueError(f"Schedule.{name} must be an Anneal (use Schedule.from_dict)")
        _check_count("calibration_batches", self.calibration_batches, 1, "expected an integer >= 1")
        _check_count(
            "bn_reestimate_batches",
            self.bn_reestimate_batches,
            0,
            "expected an integer >= 0 (0: keep the running averages)",
        )
        if self.on_divergence not in DIVERGENCE_ACTIONS:
            _fail("on_divergence", self.on_divergence, f"allowed: {', '.join(DIVERGENCE_ACTIONS)}")
        factor = self.divergence_factor
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 1:
            _fail("divergence_factor", factor, "expected a number > 1 (e.g. 2.0)")
        _check_count("divergence_window", self.divergence_window, 1, "expected an integer >= 1")
        if not isinstance(self.fit_to_run, bool):
            _fail("fit_to_run", self.fit_to_run, "expected true or false")
        self._check_bn_freeze_after_anneal()

    def _check_bn_freeze_after_anneal(self) -> None:
        # Frozen BN statistics are the running averages of the batches just before the freeze.
        # Right after an anneal those batches ran at wider bit widths; freezing then made
        # ResNet-20 (W4A4, annealed 8 → 4 over one epoch) go from loss 0.2 to 12 in three
        # steps and never recover, while one more epoch with live statistics trained fine.
        if self.freeze_bn_epoch is None:
            return
        for role, name in zip(ROLES, ("weight_anneal", "act_anneal"), strict=True):
            if self.anneal_for(role).epochs == 0:
                continue
            settled = self.settled_epoch(role)
            if self.freeze_bn_epoch <= settled:
                _fail(
                    "freeze_bn_epoch",
                    self.freeze_bn_epoch,
                    f"BN statistics must stay live for a whole epoch at the final bit width "
                    f"after {name} ends (its first epoch entirely at the target is {settled}); "
                    f"freezing them right after annealing diverges. Use a value >= "
                    f"{settled + 1} or null",
                )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | Schedule | None) -> Schedule:
        """Build from a (possibly OmegaConf) mapping; unknown keys are an error."""
        if data is None:
            return cls()
        if isinstance(data, Schedule):
            return data
        data = to_plain(data)
        if not isinstance(data, Mapping):
            raise ValueError(f"schedule expects a mapping, got {type(data).__name__}")
        check_keys("schedule", data, (f.name for f in dataclasses.fields(cls)))
        kwargs = dict(data)
        for name in ("weight_anneal", "act_anneal"):
            value = kwargs.get(name) or {}
            if isinstance(value, Anneal):
                continue
            if not isinstance(value, Mapping):
                _fail(name, value, "expected a mapping of mode, start_epoch, epochs, start_bits")
            check_keys(f"schedule.{name}", value, (f.name for f in dataclasses.fields(Anneal)))
            try:
                kwargs[name] = Anneal(**value)
            except ValueError as err:
                # Anneal does not know which role it is for; the config key does.
                raise ValueError(
                    str(err).replace("schedule.anneal.", f"schedule.{name}.")
                ) from None
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ queries
    @property
    def act_start(self) -> int:
        return self.warmup_epochs if self.act_start_epoch is None else self.act_start_epoch

    def start_of(self, role: str) -> int:
        """Epoch fake quantization starts for ``role``."""
        if role not in ROLES:
            raise ValueError(f"role={role!r} is invalid: allowed: {', '.join(ROLES)}")
        return self.warmup_epochs if role == "weight" else self.act_start

    def anneal_for(self, role: str) -> Anneal:
        return self.weight_anneal if role == "weight" else self.act_anneal

    def phase(self, epoch: int) -> Phase:
        """Which parts are on during ``epoch``."""
        return Phase(
            weights_on=epoch >= self.warmup_epochs,
            acts_on=epoch >= self.act_start,
            bn_frozen=self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch,
            observers_frozen=(
                self.freeze_observer_epoch is not None and epoch >= self.freeze_observer_epoch
            ),
        )

    def bits(self, role: str, target: int, epoch: int, fraction: float = 0.0) -> int:
        """The bit width ``role``'s quantizers anneal to at ``epoch + fraction``.

        ``target`` is the lowest target of that role in the model; each quantizer then runs at
        ``max(bits, its own target)`` (see :func:`qat.anneal_bits`).
        """
        start = self.start_of(role)
        return self.anneal_for(role).bits(target, epoch, fraction, start=start)

    def settled_epoch(self, role: str) -> int:
        """First epoch ``role`` spends entirely at its target bit width."""
        a = self.anneal_for(role)
        first = a.first_epoch(self.start_of(role))
        if a.epochs == 0:
            return first
        # ``step`` reaches the target in the window's last epoch; ``linear`` / ``cosine`` at
        # the window's end.
        return first + a.epochs - 1 if a.mode == "step" else first + a.epochs

    def steps_within_epoch(self) -> bool:
        """True when a bit width can change inside an epoch (linear / cosine annealing)."""
        return any(a.mode != "step" and a.epochs > 0 for a in (self.weight_anneal, self.act_anneal))

    def steps_at(self, epoch: int, targets: Mapping[str, int | None]) -> dict[str, tuple]:
        """The steps taken at the start of ``epoch`` once quantization runs, for the guard:
        ``bn_freeze`` / ``observer_freeze`` (``()``) and ``weight_bits`` / ``act_bits``
        (``(old, new)`` widths, for a role quantized in the epoch before); ``targets`` are the
        lowest target widths per role (as for :meth:`bits`)."""
        if epoch == 0:
            return {}
        before, now = self.phase(epoch - 1), self.phase(epoch)
        steps: dict[str, tuple] = {}
        if now.bn_frozen and not before.bn_frozen:
            steps["bn_freeze"] = ()
        if now.observers_frozen and not before.observers_frozen:
            steps["observer_freeze"] = ()
        for role, key in zip(ROLES, ("weight_bits", "act_bits"), strict=True):
            target = targets.get(role)
            was_on = before.weights_on if role == "weight" else before.acts_on
            if target is None or not was_on:
                continue
            old, new = self.bits(role, target, epoch - 1, 1.0), self.bits(role, target, epoch)
            if new < old:
                steps[key] = (old, new)
        return steps

    def end_epoch(self) -> int:
        """First epoch at which every scheduled change has happened."""
        ends = [self.warmup_epochs, self.act_start]
        for role in ROLES:
            a = self.anneal_for(role)
            ends.append(a.first_epoch(self.start_of(role)) + a.epochs)
        ends += [e for e in (self.freeze_bn_epoch, self.freeze_observer_epoch) if e is not None]
        return max(ends)

    def last_change_epoch(self) -> int:
        """The last epoch in which something changes (quantization starts, a bit width steps
        or reaches its target, a freeze): a run of ``last_change_epoch() + 1`` epochs sees it
        all."""
        events = [self.warmup_epochs, self.act_start]
        for role in ROLES:
            a = self.anneal_for(role)
            if a.epochs > 0:
                # Both kinds of window end in their last epoch (step: at its start; linear /
                # cosine: at its end).
                events.append(a.first_epoch(self.start_of(role)) + a.epochs - 1)
        events += [e for e in (self.freeze_bn_epoch, self.freeze_observer_epoch) if e is not None]
        return max(events)

    def fitted(self, max_epochs: int) -> Schedule:
        """This schedule scaled onto a run of ``max_epochs`` epochs (itself when it fits).

        Each epoch number ``e`` becomes ``floor(e * max_epochs / (last_change_epoch() + 1))``,
        so the order of the phases is kept and the last change lands in the last epoch.
        Annealing windows keep at least one epoch. A freeze that would land where it can no
        longer follow what it must follow is dropped (never freezes): the BN freeze needs an
        epoch at the final bit width after the anneal (see ``freeze_bn_epoch``) and, like the
        observer freeze, an epoch after quantization starts; a one-epoch run has neither.
        """
        if not self.fit_to_run or max_epochs < 1 or self.last_change_epoch() < max_epochs:
            return self
        span = self.last_change_epoch() + 1

        def scale(epoch: int) -> int:
            return epoch * max_epochs // span

        warmup = scale(self.warmup_epochs)
        act_start = None if self.act_start_epoch is None else max(scale(self.act_start), warmup)
        starts = {"weight": warmup, "activation": warmup if act_start is None else act_start}
        anneals = {}
        for role in ROLES:
            a = self.anneal_for(role)
            first = a.first_epoch(self.start_of(role))
            start = None if a.start_epoch is None else max(scale(first), starts[role])
            new_first = starts[role] if start is None else start
            epochs = 0 if a.epochs == 0 else scale(first + a.epochs - 1) - new_first + 1
            anneals[role] = dataclasses.replace(a, start_epoch=start, epochs=max(epochs, 0))
        quantized_from = warmup
        freeze_bn = None
        if self.freeze_bn_epoch is not None:
            freeze_bn = scale(self.freeze_bn_epoch)
            after = [quantized_from + 1] if self.freeze_bn_epoch > self.warmup_epochs else []
            for role in ROLES:
                a = anneals[role]
                if a.epochs > 0:
                    first = starts[role] if a.start_epoch is None else a.start_epoch
                    after.append(first + a.epochs if a.mode == "step" else first + a.epochs + 1)
            freeze_bn = max([freeze_bn, *after])
            if freeze_bn >= max_epochs:
                freeze_bn = None
        freeze_obs = None
        if self.freeze_observer_epoch is not None:
            freeze_obs = scale(self.freeze_observer_epoch)
            if self.freeze_observer_epoch > self.act_start:
                freeze_obs = max(freeze_obs, starts["activation"] + 1)
            if freeze_obs >= max_epochs:
                freeze_obs = None
        return dataclasses.replace(
            self,
            warmup_epochs=warmup,
            act_start_epoch=act_start,
            weight_anneal=anneals["weight"],
            act_anneal=anneals["activation"],
            freeze_bn_epoch=freeze_bn,
            freeze_observer_epoch=freeze_obs,
        )

    def describe_change(self, other: Schedule) -> str:
        """The keys whose values differ from ``other``'s, as ``key a → b`` (for the log)."""
        mine, theirs = self.to_dict(), other.to_dict()
        changes = []
        for key, value in mine.items():
            if isinstance(value, dict):
                changes += [
                    f"{key}.{k} {v} → {theirs[key][k]}"
                    for k, v in value.items()
                    if theirs[key][k] != v
                ]
            elif theirs[key] != value:
                changes.append(f"{key} {value} → {theirs[key]}")
        return ", ".join(changes)
