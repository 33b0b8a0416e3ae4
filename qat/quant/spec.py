"""Validated, YAML-friendly descriptions of *what* to quantize and *how*.

A :class:`QuantSpec` describes one quantizer (bits, sign, symmetry, granularity, range method);
a :class:`Recipe` names the weight and activation specs for a whole model plus per-layer
overrides by module-name pattern. Both hold only ints, bools, floats and strings so that they
round-trip through Hydra / OmegaConf configs and checkpoints, and both validate eagerly: a wrong
value raises ``ValueError`` naming the field, the value and what is allowed.

Example:
    >>> recipe = Recipe.from_dict({
    ...     "weight": {"bits": 4},
    ...     "activation": {"bits": 4},
    ...     "overrides": [{"pattern": "stem.*", "weight": {"bits": 8}, "activation": {"bits": 8}}],
    ... })
    >>> recipe.weight.bits, recipe.weight.per_channel
    (4, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Bit widths that quantize. ``16`` and ``32`` mean "leave this tensor in float" (pass-through).
QUANT_BITS = (2, 3, 4, 5, 6, 7, 8)
FLOAT_BITS = (16, 32)
RANGE_METHODS = ("minmax", "ema", "percentile", "mse")
LEARNED_RANGES = ("none", "lsq", "pact")
#: ``group_size`` values: 0 (per channel / per tensor) or one scale per this many inputs.
GROUP_SIZES = (0, 16, 32, 64, 128, 256, 512, 1024)
#: Dynamic activation scales: ``none`` (static ranges), per ``token`` (each row of the last
#: dimension) or per ``tensor``, computed from each call's values as ONNX Runtime's
#: ``DynamicQuantizeLinear`` (and llama.cpp, per block) does.
DYNAMIC_MODES = ("none", "token", "tensor")
#: Integer grids: ``affine`` (the numerics contract) or GGUF's block grids, bit for bit as
#: ggml / ``gguf.quants`` compute them (blocks of 32, fp16 scale ``d``; :mod:`qat.quant.blocks`).
#: ``q4_k`` / ``q6_k``: GGUF's k-quants (super-blocks of 256, :mod:`qat.quant.kquants`), weights
#: only.
GRIDS = ("affine", "q8_0", "q4_0", "q4_k", "q6_k")
GGUF_GRID_BITS = {"q8_0": 8, "q4_0": 4, "q4_k": 4, "q6_k": 6}
GGUF_GRID_BLOCK = {"q8_0": 32, "q4_0": 32, "q4_k": 256, "q6_k": 256}
_LLM_FIELDS = {"group_size", "dynamic", "grid"}


def _fail(owner: str, name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{owner}.{name}={value!r} is invalid: {allowed}")


def check_keys(owner: str, keys: Iterable[Any], allowed: Iterable[str]) -> None:
    """Raise ``ValueError`` naming ``owner``, the unknown keys and the allowed ones."""
    allowed = list(allowed)
    unknown = sorted(str(k) for k in set(keys) - set(allowed))
    if unknown:
        raise ValueError(f"{owner} has no key(s) {unknown}; allowed: {', '.join(allowed)}")


def to_plain(data: Any) -> Any:
    """Nested mappings / sequences (OmegaConf containers included) → plain dicts and lists.

    Duck-typed, so the quantization core never imports a config library: reading a config
    node's items resolves its interpolations.
    """
    if isinstance(data, Mapping):
        return {k: to_plain(v) for k, v in data.items()}
    if isinstance(data, Sequence) and not isinstance(data, str | bytes):
        return [to_plain(v) for v in data]
    return data


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(owner, name, value, "expected true or false")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (a layer's weight or an activation) is fake-quantized.

    Args:
        bits: 2–8 quantize; 16 or 32 leave the tensor in float.
        signed: integer grid ``[-2^(b-1), 2^(b-1)-1]`` if true, ``[0, 2^b-1]`` if false.
        symmetric: zero point fixed at 0 (required for weights on the integer kernels).
        per_channel: one scale per output channel; the axis comes from the layer type
            (Conv/Linear 0, ConvTranspose 1), so it is not part of the spec.
        narrow_range: signed grid without its most negative value (``-127..127`` at 8 bits).
        reduce_range: cap the integer grid at 7 bits (8-bit weights use ``[-64, 63]``); no
            effect below 8 bits. x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake) run
            u8×s8 kernels (PyTorch's fbgemm / oneDNN, ONNX Runtime's MLAS) that add pairs of
            products in int16 with saturation: with full-range 8-bit weights and u8 activations
            a sum can exceed 32767 and the integer model silently disagrees with the trained
            one. With weights in ``[-64, 64]`` no pair can (255·128 < 32768). On by default
            for weights; set it false for a VNNI or GPU target to get the full 8-bit grid.
        range_method: how ranges are observed: ``minmax`` (current tensor), ``ema`` (moving
            average of per-batch min/max), ``percentile`` or ``mse`` (clip searched per batch).
        learned: ``none``, ``lsq`` (learned step size) or ``pact`` (learned clip for
            activations: ``[0, α]`` unsigned or ``[−α, α]`` signed, zero point 0 either way).
        ema_decay: weight of the old value in the ``ema`` average, in [0, 1).
        percentile: upper percentile kept by the ``percentile`` method, in (50, 100].
        group_size: 0, or one scale per ``group_size`` consecutive elements along the input
            dimension: of each output row (linear / embedding weights, ``per_channel=true``),
            or of each token (dynamic activations). 32 / 64 / 128 are the usual LLM groups.
        dynamic: activations only: ``none`` (static ranges), ``token`` (scale and zero point
            from each row of the last dimension, at every call; with ``group_size`` per block
            of it) or ``tensor`` (one per call, ONNX Runtime's ``DynamicQuantizeLinear``).
            Layers then quantize their *inputs* and leave their outputs in float.
        grid: ``affine`` (``clamp(round(x·(1/s)) + z)``, round half to even), or GGUF's
            ``q8_0`` (8 bits, ``d = amax/127``, round half away from zero) / ``q4_0`` (4 bits,
            ``d = signed max / −8``): blocks of ``group_size=32``, fp16 ``d``, bit for bit as
            llama.cpp dequantizes them. These grids fix their own integer range, so
            ``narrow_range`` / ``reduce_range`` do not apply.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    per_channel: bool = False
    narrow_range: bool = False
    reduce_range: bool = False
    range_method: str = "minmax"
    learned: str = "none"
    ema_decay: float = 0.9
    percentile: float = 99.99
    group_size: int = 0
    dynamic: str = "none"
    grid: str = "affine"

    def __post_init__(self) -> None:
        owner = "QuantSpec"
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            _fail(owner, "bits", self.bits, "expected an integer 2–8, or 16/32 for float")
        if self.bits not in QUANT_BITS + FLOAT_BITS:
            _fail(owner, "bits", self.bits, "allowed: 2–8 (quantize) or 16/32 (keep float)")
        for name in ("signed", "symmetric", "per_channel", "narrow_range", "reduce_range"):
            _check_bool(owner, name, getattr(self, name))
        if self.range_method not in RANGE_METHODS:
            _fail(owner, "range_method", self.range_method, f"allowed: {', '.join(RANGE_METHODS)}")
        if self.learned not in LEARNED_RANGES:
            _fail(owner, "learned", self.learned, f"allowed: {', '.join(LEARNED_RANGES)}")
        if self.narrow_range and not self.signed:
            _fail(owner, "narrow_range", True, "allowed only with signed=true")
        if self.learned == "pact" and self.per_channel:
            _fail(
                owner,
                "learned",
                "pact",
                "allowed only per tensor (PACT learns one clip): set per_channel=false",
            )
        if not isinstance(self.ema_decay, int | float) or not 0.0 <= self.ema_decay < 1.0:
            _fail(owner, "ema_decay", self.ema_decay, "expected a number in [0, 1)")
        if not isinstance(self.percentile, int | float) or not 50.0 < self.percentile <= 100.0:
            _fail(owner, "percentile", self.percentile, "expected a number in (50, 100]")
        self._check_llm_fields(owner)

    def _check_llm_fields(self, owner: str) -> None:
        """``group_size`` / ``dynamic`` / ``grid``, and how they combine with the rest."""
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g not in GROUP_SIZES:
            _fail(owner, "group_size", g, f"allowed: {', '.join(map(str, GROUP_SIZES))} (0: off)")
        if self.dynamic not in DYNAMIC_MODES:
            _fail(owner, "dynamic", self.dynamic, f"allowed: {', '.join(DYNAMIC_MODES)}")
        if self.grid not in GRIDS:
            _fail(owner, "grid", self.grid, f"allowed: {', '.join(GRIDS)}")
        if self.dynamic != "none":
            if self.learned != "none":
                _fail(owner, "learned", self.learned, "dynamic scales are not learned: use none")
            if self.per_channel:
                _fail(owner, "per_channel", True, "dynamic scales are per token or per tensor")
            if self.dynamic == "tensor" and g:
                _fail(owner, "group_size", g, "dynamic=tensor has one scale: use 0 or token")
        elif g and not self.per_channel:
            _fail(
                owner,
                "group_size",
                g,
                "groups are per output row of a weight (per_channel=true) or per block of a "
                "token (dynamic=token)",
            )
        if self.grid != "affine":
            bits = GGUF_GRID_BITS[self.grid]
            if self.bits not in (bits, *FLOAT_BITS):
                _fail(owner, "bits", self.bits, f"grid={self.grid} has {bits} bits")
            block = GGUF_GRID_BLOCK[self.grid]
            if g != block:
                _fail(
                    owner,
                    "group_size",
                    g,
                    f"grid={self.grid} quantizes blocks of {block}: set {block}",
                )
            if block == 256 and self.dynamic != "none":
                _fail(owner, "grid", self.grid, "k-quant grids are for weights: use q8_0")
            if not self.signed or not self.symmetric:
                _fail(owner, "grid", self.grid, "GGUF grids are signed and symmetric")
            if self.learned != "none":
                _fail(owner, "learned", self.learned, f"grid={self.grid} fixes d: use none")
            if self.dynamic == "tensor":
                _fail(owner, "dynamic", "tensor", f"grid={self.grid} is per block: use token")

    @property
    def enabled(self) -> bool:
        """False for the float pass-through widths (16, 32)."""
        return self.bits in QUANT_BITS

    def replace(self, **changes: Any) -> QuantSpec:
        """A copy with ``changes`` applied (validated like the original)."""
        check_keys("QuantSpec", changes, (f.name for f in dataclasses.fields(self)))
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any] | QuantSpec, base: QuantSpec | None = None
    ) -> QuantSpec:
        """Build from a mapping, filling unspecified fields from ``base`` (or the defaults)."""
        if isinstance(data, QuantSpec):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"QuantSpec expects a mapping of fields, got {type(data).__name__}")
        return (base or cls()).replace(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_weight_spec() -> QuantSpec:
    """Signed symmetric per-channel 8-bit weights (s8 weights for the integer kernels).

    ``reduce_range`` is on, so exported models agree with the trained one on every x86 CPU
    (see :class:`QuantSpec`).
    """
    return QuantSpec(
        bits=8,
        signed=True,
        symmetric=True,
        per_channel=True,
        reduce_range=True,
        range_method="minmax",
    )


def default_activation_spec() -> QuantSpec:
    """Unsigned per-tensor 8-bit activations with a zero point (u8 activations), EMA ranges."""
    return QuantSpec(bits=8, signed=False, symmetric=False, per_channel=False, range_method="ema")


def default_embedding_spec() -> QuantSpec:
    """Embedding tables stay in float unless a recipe sets ``embedding.bits`` (weight-only)."""
    return QuantSpec(bits=32, signed=True, symmetric=True, per_channel=True)


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer changes, for the modules whose qualified name matches ``pattern``.

    Args:
        pattern: an ``fnmatch`` pattern over module names (``stem.0``, ``layer1.*``, ``fc``).
            A pattern that matches no layer is an error at :func:`qat.prepare` time.
        weight: fields replacing the recipe's weight spec for these layers.
        activation: fields replacing the recipe's activation spec for these layers' outputs.
        skip: leave these layers in float.
    """

    pattern: str
    weight: Mapping[str, Any] | None = None
    activation: Mapping[str, Any] | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        owner = "LayerOverride"
        if not isinstance(self.pattern, str) or not self.pattern:
            _fail(owner, "pattern", self.pattern, "expected a non-empty module-name pattern")
        _check_bool(owner, "skip", self.skip)
        for name in ("weight", "activation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                _fail(owner, name, value, "expected a mapping of QuantSpec fields or null")
            if value is not None:
                # Validate now against the defaults, so a typo fails at load time. The LLM
                # fields combine with the spec they override (grid q8_0 needs group_size=32
                # there): those are checked once merged, by Recipe and at prepare time.
                try:
                    QuantSpec.from_dict(value)
                except ValueError:
                    if not _LLM_FIELDS & set(value):
                        raise


@dataclass(frozen=True)
class Recipe:
    """What to quantize in a model.

    Args:
        weight: spec for every quantized layer's weight.
        activation: spec for the activations (model input, layer outputs, residual adds).
        overrides: per-layer changes, applied in order (later ones win).
        quantize_input: put an activation quantizer on the model's input.
        fuse_bn: fuse Conv2d→BatchNorm2d(→ReLU) sequences into ``QConvBn2d``.
        fuse: explicit groups of module names to fuse, ``[[conv, bn], [conv, bn, relu],
            [conv, relu], [linear, relu]]``, for models that do not build these as adjacent
            children of an ``nn.Sequential`` (adjacent ones are found automatically).
        embedding: spec for ``nn.Embedding`` tables (weight-only: a lookup's output is a row of
            the quantized table); bits 32 (the default) leaves them in float. Overrides'
            ``weight`` fields apply to matching embeddings too.
        quantize_bias: train with each integer conv / linear bias rounded onto the int32 grid
            ``s_in · s_w`` the runtimes add it on (straight-through; :func:`qat.link_bias_quantizers`).
            It matters where that grid is coarse next to the output step (depthwise convs at
            2 bits): validation then measures what the exported model computes.
    """

    weight: QuantSpec = field(default_factory=default_weight_spec)
    activation: QuantSpec = field(default_factory=default_activation_spec)
    overrides: tuple[LayerOverride, ...] = ()
    quantize_input: bool = True
    fuse_bn: bool = True
    fuse: tuple[tuple[str, ...], ...] = ()
    quantize_bias: bool = False
    embedding: QuantSpec = field(default_factory=default_embedding_spec)

    def __post_init__(self) -> None:
        if not isinstance(self.weight, QuantSpec):
            raise ValueError(
                "Recipe.weight must be a QuantSpec (use Recipe.from_dict for mappings)"
            )
        if not isinstance(self.activation, QuantSpec):
            raise ValueError(
                "Recipe.activation must be a QuantSpec (use Recipe.from_dict for mappings)"
            )
        if self.weight.enabled and (not self.weight.signed or not self.weight.symmetric):
            raise ValueError(
                "Recipe.weight must be signed and symmetric (zero point 0), as the integer "
                "kernels require: set weight.signed=true and weight.symmetric=true"
            )
        if self.weight.learned == "pact":
            _fail("Recipe.weight", "learned", "pact", "PACT is for activations; use lsq or none")
        if not isinstance(self.embedding, QuantSpec):
            raise ValueError("Recipe.embedding must be a QuantSpec (use Recipe.from_dict)")
        for role in ("weight", "embedding"):
            spec = getattr(self, role)
            if spec.dynamic != "none":
                _fail(f"Recipe.{role}", "dynamic", spec.dynamic, "weights are static: use none")
            if role == "embedding" and spec.enabled and not (spec.signed and spec.symmetric):
                _fail("Recipe.embedding", "symmetric", spec.symmetric, "signed symmetric only")
        act = self.activation
        if act.group_size and act.dynamic == "none":
            _fail(
                "Recipe.activation",
                "group_size",
                act.group_size,
                "static activation ranges are per tensor: use 0, or dynamic=token for blocks",
            )
        _check_bool("Recipe", "quantize_input", self.quantize_input)
        _check_bool("Recipe", "fuse_bn", self.fuse_bn)
        _check_bool("Recipe", "quantize_bias", self.quantize_bias)
        object.__setattr__(self, "overrides", tuple(self.overrides))
        fuse = []
        for i, group in enumerate(self.fuse or ()):
            if isinstance(group, str) or not all(isinstance(n, str) and n for n in group):
                _fail("Recipe", f"fuse[{i}]", group, "expected a list of module names")
            if not 2 <= len(group) <= 3:
                _fail(
                    "Recipe", f"fuse[{i}]", list(group), "expected 2 or 3 names: conv, bn[, relu]"
                )
            fuse.append(tuple(group))
        object.__setattr__(self, "fuse", tuple(fuse))
        for ov in self.overrides:
            if not isinstance(ov, LayerOverride):
                raise ValueError("Recipe.overrides must hold LayerOverride objects")
            spec = self.weight_for(ov)
            QuantSpec.from_dict(ov.activation or {}, base=self.activation)
            if spec.enabled and (not spec.signed or not spec.symmetric):
                raise ValueError(
                    f"override {ov.pattern!r}: weights must be signed and symmetric "
                    "(set weight.signed=true, weight.symmetric=true)"
                )

    def weight_for(self, override: LayerOverride) -> QuantSpec:
        return QuantSpec.from_dict(override.weight or {}, base=self.weight)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | Recipe | None) -> Recipe:
        """Build from a (possibly OmegaConf) mapping; unknown keys are an error."""
        if data is None:
            return cls()
        if isinstance(data, Recipe):
            return data
        data = to_plain(data)
        if not isinstance(data, Mapping):
            raise ValueError(f"Recipe expects a mapping, got {type(data).__name__}")
        check_keys("Recipe", data, (f.name for f in dataclasses.fields(cls)))
        kwargs: dict[str, Any] = dict(data)
        kwargs["weight"] = QuantSpec.from_dict(data.get("weight") or {}, base=default_weight_spec())
        kwargs["activation"] = QuantSpec.from_dict(
            data.get("activation") or {}, base=default_activation_spec()
        )
        kwargs["embedding"] = QuantSpec.from_dict(
            data.get("embedding") or {}, base=default_embedding_spec()
        )
        overrides = []
        for i, ov in enumerate(data.get("overrides") or ()):
            if isinstance(ov, LayerOverride):
                overrides.append(ov)
                continue
            if not isinstance(ov, Mapping):
                raise ValueError(f"Recipe.overrides[{i}] must be a mapping, got {ov!r}")
            check_keys(f"Recipe.overrides[{i}]", ov, ("pattern", "weight", "activation", "skip"))
            if "pattern" not in ov:
                raise ValueError(f"Recipe.overrides[{i}] needs a 'pattern' (module-name glob)")
            overrides.append(LayerOverride(**ov))
        kwargs["overrides"] = tuple(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight": self.weight.to_dict(),
            "activation": self.activation.to_dict(),
            "overrides": [
                {
                    "pattern": o.pattern,
                    "weight": None if o.weight is None else dict(o.weight),
                    "activation": None if o.activation is None else dict(o.activation),
                    "skip": o.skip,
                }
                for o in self.overrides
            ],
            "quantize_input": self.quantize_input,
            "fuse_bn": self.fuse_bn,
            "fuse": [list(g) for g in self.fuse],
            "quantize_bias": self.quantize_bias,
            "embedding": self.embedding.to_dict(),
        }
