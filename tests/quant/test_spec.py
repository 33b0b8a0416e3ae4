"""Every bad spec raises ValueError naming the field, the value and what is allowed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qat.quant.spec import FLOAT_BITS, LEARNED_RANGES, QUANT_BITS, RANGE_METHODS, QuantSpec, Recipe

BAD_SPECS = [
    ({"bits": 1}, "bits=1"),
    ({"bits": 9}, "bits=9"),
    ({"bits": 4.0}, "bits=4.0"),
    ({"bits": True}, "bits=True"),
    ({"bits": "8"}, "bits='8'"),
    ({"signed": "yes"}, "signed='yes'"),
    ({"symmetric": 1}, "symmetric=1"),
    ({"per_channel": None}, "per_channel=None"),
    ({"range_method": "max"}, "range_method='max'"),
    ({"learned": "lsq+"}, "learned='lsq+'"),
    ({"signed": False, "narrow_range": True}, "narrow_range=True"),
    ({"learned": "pact", "per_channel": True}, "learned='pact'"),
    ({"ema_decay": 1.0}, "ema_decay=1.0"),
    ({"percentile": 40}, "percentile=40"),
    ({"colour": "red"}, "colour"),
]


@pytest.mark.parametrize(("fields", "named"), BAD_SPECS)
def test_bad_spec_raises_naming_field(fields: dict, named: str) -> None:
    with pytest.raises(ValueError) as err:
        QuantSpec.from_dict(fields)
    assert named in str(err.value)
    assert "allowed" in str(err.value) or "expected" in str(err.value)


def test_float_bits_disable() -> None:
    assert not QuantSpec(bits=16).enabled
    assert not QuantSpec(bits=32).enabled
    assert QuantSpec(bits=2).enabled


@pytest.mark.parametrize(
    ("recipe", "named"),
    [
        ({"weight": {"signed": False, "symmetric": False}}, "weight must be signed and symmetric"),
        ({"weight": {"learned": "pact"}}, "pact"),
        ({"activation": {"bits": 1}}, "bits=1"),
        ({"overrides": [{"weight": {"bits": 4}}]}, "pattern"),
        ({"overrides": [{"pattern": "fc", "bitz": 4}]}, "bitz"),
        ({"overrides": [{"pattern": "fc", "weight": {"bits": 12}}]}, "bits=12"),
        (
            {"overrides": [{"pattern": "fc", "weight": {"symmetric": False}}]},
            "signed and symmetric",
        ),
        ({"fuse": [["conv"]]}, "fuse[0]"),
        ({"quantise_input": True}, "quantise_input"),
        ({"fuse_bn": "yes"}, "fuse_bn"),
        ({"quantize_bias": 1}, "quantize_bias"),
    ],
)
def test_bad_recipe_raises(recipe: dict, named: str) -> None:
    with pytest.raises(ValueError, match=None) as err:
        Recipe.from_dict(recipe)
    assert named in str(err.value)


def test_recipe_round_trips_through_dict_and_omegaconf() -> None:
    from omegaconf import OmegaConf

    data = {
        "weight": {"bits": 4, "learned": "lsq"},
        "activation": {"bits": 4, "learned": "pact"},
        "overrides": [
            {"pattern": "stem.*", "weight": {"bits": 8}, "activation": {"bits": 8}},
            {"pattern": "fc", "weight": {}},  # an empty spec (no change) survives the trip
        ],
    }
    recipe = Recipe.from_dict(OmegaConf.create(data))
    assert recipe.weight.bits == 4 and recipe.weight.per_channel  # defaults kept
    assert recipe.activation.learned == "pact" and not recipe.activation.signed
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert OmegaConf.to_container(OmegaConf.create(recipe.to_dict())) == recipe.to_dict()


VALUES = st.one_of(
    st.integers(-2, 40),
    st.booleans(),
    st.floats(-1, 120),
    st.just(float("nan")),
    st.sampled_from(["minmax", "ema", "percentile", "mse", "none", "lsq", "pact", "x", ""]),
    st.none(),
)
FIELDS = [
    "bits",
    "signed",
    "symmetric",
    "per_channel",
    "narrow_range",
    "range_method",
    "learned",
    "ema_decay",
    "percentile",
]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=5))
def test_random_specs_either_valid_or_clear_error(fields: dict) -> None:
    try:
        spec = QuantSpec.from_dict(fields)
    except ValueError as err:
        msg = str(err)
        assert any(f"QuantSpec.{name}=" in msg for name in fields), msg
        return
    # A spec that constructs satisfies every documented invariant.
    assert spec.bits in QUANT_BITS + FLOAT_BITS and not isinstance(spec.bits, bool)
    assert spec.range_method in RANGE_METHODS and spec.learned in LEARNED_RANGES
    assert all(
        isinstance(getattr(spec, f), bool)
        for f in ("signed", "symmetric", "per_channel", "narrow_range")
    )
    assert not (spec.narrow_range and not spec.signed)
    assert 0 <= spec.ema_decay < 1 and 50 < spec.percentile <= 100


def test_weights_default_to_a_7_bit_grid_at_8_bits_only() -> None:
    # x86 u8×s8 kernels without VNNI add product pairs in int16: |w| ≤ 64 keeps 255·128 < 2^15.
    from qat.quant.qparams import qrange
    from qat.quant.spec import default_weight_spec

    spec = default_weight_spec()
    assert spec.reduce_range is True
    assert qrange(8, True, reduce_range=True) == (-64, 63)
    assert qrange(8, True, narrow_range=True, reduce_range=True) == (-63, 63)
    assert qrange(8, True) == (-128, 127)
    for bits in range(2, 8):
        assert qrange(bits, True, reduce_range=True) == qrange(bits, True)
    recipe = Recipe.from_dict({"weight": {"bits": 8}})
    assert recipe.weight.reduce_range is True
    assert Recipe.from_dict({"weight": {"reduce_range": False}}).weight.reduce_range is False
    with pytest.raises(ValueError, match="reduce_range"):
        QuantSpec(reduce_range="yes")
