"""Bad configs fail before any work with one line that names the key and the allowed values.

Covered in tests/lit/test_config.py (not repeated here): ``quant.bits`` out of range, an
unknown model, missing CIFAR-10 / ImageFolder data, model / data channel and image-size
mismatches, ``act_start_epoch`` before the warm-up, unknown export targets. Random
``QuantSpec`` fields: tests/quant/test_spec.py. Here: the keys those do not reach (nested recipe
fields, override patterns, the annealing schedule against the targets and the run length,
missing Fashion-MNIST), through ``train(cfg)``, and random whole recipes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch import Trainer
from lit_helpers import FAST, compose_train
from omegaconf import OmegaConf, open_dict

import qat
import qat.data.fashion_mnist
from qat.lit.classifier import ClassifierModule
from qat.lit.config import ConfigError, validate_config
from qat.lit.train import train
from qat.quant.spec import QUANT_BITS, Recipe

ANNEAL = ["schedule=anneal", "quant=w4a4"]  # warm-up 1, weights 8 → 4 over epochs 1–4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["quant.weight.bits=12"],
            r"^quant\.weight\.bits=12 is invalid: allowed: 2–8 \(quantize\) or 16/32",
        ),
        (
            ["quant=w4a4", "quant.overrides.2.activation.bits=1"],
            r"^quant\.overrides\[2\]\.activation\.bits=1 is invalid: allowed: 2–8",
        ),
        (
            ["+quant.weight.colour=red"],
            r"^quant\.weight has no key\(s\) \['colour'\]; allowed: bits",
        ),
        (["quant.activation.ema_decay=1.5"], r"^quant\.activation\.ema_decay=1\.5 is invalid"),
        (
            ["quant=w4a4", "quant.overrides.1.pattern=stemm.0"],
            r"^quant\.overrides\[1\]\.pattern='stemm\.0' matches no quantizable layer "
            r"\(closest: stem\.0\); layer names are: stem\.0, conv2\.0",
        ),
        (
            [*ANNEAL, "schedule.weight_anneal.start_bits=3"],
            r"^schedule\.weight_anneal\.start_bits=3 is below the weight target of 4 bits .*"
            r"allowed 4–8",
        ),
        (
            [*ANNEAL, "trainer.max_epochs=3", "schedule.fit_to_run=false"],
            r"^schedule\.weight_anneal .* ends after trainer\.max_epochs=3: the run would stop at "
            r"6-bit weights, above the target 4; set trainer\.max_epochs>=5",
        ),
        (
            [
                *ANNEAL,
                "trainer.max_epochs=5",
                "schedule.fit_to_run=false",
                "schedule.act_anneal.mode=linear",
                "schedule.freeze_bn_epoch=null",
            ],
            r"^schedule\.act_anneal .* trainer\.max_epochs=5: .* 5-bit activations",
        ),
        (
            ["schedule.act_anneal.epochs=-1"],
            r"^schedule\.act_anneal\.epochs=-1 is invalid: expected an epoch number >= 0",
        ),
        (
            ["schedule.weight_anneal.mode=exp"],
            r"^schedule\.weight_anneal\.mode='exp' is invalid: allowed: step, linear, cosine",
        ),
        (["schedule.warmup_epochs=-1"], r"^schedule\.warmup_epochs=-1 is invalid"),
        # Lightning's "forever" would end in OverflowError laying out the lr schedule.
        (
            ["trainer.max_epochs=-1"],
            r"^trainer\.max_epochs=-1 is invalid: expected an integer >= 0 \(0: calibrate only",
        ),
        (["trainer.max_epochs=null"], r"^trainer\.max_epochs=None is invalid"),
        (["+trainer.max_steps=-2"], r"^trainer\.max_steps=-2 is invalid: expected an integer"),
        (["trainer.min_epochs=1.5"], r"^trainer\.min_epochs=1\.5 is invalid"),
        # torch's "ValueError: Invalid learning rate: -1" would come from configure_optimizers.
        (["optimizer.lr=-1"], r"^optimizer\.lr=-1 is invalid: expected a finite number >= 0"),
        (["optimizer.lr=nan"], r"^optimizer\.lr=nan is invalid"),
        (["optimizer.weight_decay=abc"], r"^optimizer\.weight_decay='abc' is invalid"),
        (
            ["optimizer.momentum=0"],  # with nesterov: true, torch's own check, run up front
            r"^optimizer \(torch\.optim\.SGD\): Nesterov momentum requires a momentum",
        ),
        (["data.batch_size=0"], r"^data\.batch_size=0 is invalid: expected an int >= 1"),
        (["data.batch_size=2.5"], r"^data\.batch_size=2\.5 is invalid"),
    ],
)
def test_bad_config_is_one_line_naming_key_and_allowed_values_before_any_work(
    overrides: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(Trainer, "fit", boom)
    monkeypatch.setattr(ClassifierModule, "__init__", boom)
    cfg = compose_train([*FAST, "model=lenet5", *overrides], tmp_path)
    with pytest.raises(ConfigError, match=message) as err:
        train(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "checkpoints").exists()


def test_schedule_checks_leave_runs_that_never_stop_mid_anneal_alone(tmp_path: Path) -> None:
    for extra in (
        ["trainer.max_epochs=6"],  # the schedule ends in time
        ["trainer.max_epochs=1"],  # the schedule is fitted to the one epoch
        ["trainer.max_epochs=3", "trainer.fast_dev_run=true"],
        ["trainer.max_epochs=3", "train=false"],
        ["quant.bits=8", "schedule.weight_anneal.start_bits=8"],  # nothing to anneal
    ):
        validate_config(compose_train([*FAST, "model=lenet5", *ANNEAL, *extra], tmp_path))


def test_missing_fashion_mnist_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a machine without the Debian package and without internet.
    monkeypatch.setattr(qat.data.fashion_mnist, "DEBIAN_DIR", tmp_path / "no-package")
    cfg = compose_train(
        ["data=fashion_mnist", f"data.data_dir={tmp_path / 'data'}", "data.download=false"],
        tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert message.startswith("data: Fashion-MNIST not found")
    assert "apt-get install dataset-fashion-mnist" in message
    assert f"data.data_dir={tmp_path / 'data'}; set data.data_dir=" in message
    assert "\n" not in message


# ---------------------------------------------------------------------- random recipes
SPEC_VALUES = {
    "bits": st.sampled_from([2, 3, 4, 8, 16, 1, 9, 0, "8", 4.0, True]),
    "signed": st.sampled_from([True, False, "yes"]),
    "symmetric": st.sampled_from([True, False, 1]),
    "per_channel": st.sampled_from([True, False, None]),
    "range_method": st.sampled_from(["minmax", "ema", "percentile", "mse", "median"]),
    "learned": st.sampled_from(["none", "lsq", "pact", "lsq+"]),
    "ema_decay": st.sampled_from([0.0, 0.9, 0.99, 1.0, -0.1]),
    "percentile": st.sampled_from([99.9, 100, 50, 120]),
    "colour": st.just("red"),
}
specs = st.dictionaries(st.sampled_from(sorted(SPEC_VALUES)), st.none(), max_size=3).flatmap(
    lambda keys: st.fixed_dictionaries({k: SPEC_VALUES[k] for k in keys})
)
PATTERNS = ["stem.0", "conv2.*", "fc", "input_quant", "*", "stemm.0", "layer9", ""]
overrides = st.fixed_dictionaries(
    {"pattern": st.sampled_from(PATTERNS)},
    optional={"weight": specs, "activation": specs, "skip": st.sampled_from([True, False, "no"])},
)
recipes = st.fixed_dictionaries(
    {},
    optional={
        "weight": specs,
        "activation": specs,
        "overrides": st.lists(overrides, max_size=3),
        "quantize_input": st.sampled_from([True, False, 0]),
        "fuse_bn": st.sampled_from([True, False]),
        "bits": st.sampled_from([2, 4, 8, 32, 1, 12]),
        "bitz": st.just(4),
    },
)


def _paths(value: object, prefix: str) -> set[str]:
    """Every key path in ``value`` as the messages spell it (``quant.overrides[1].weight``)."""
    out = {prefix}
    if isinstance(value, dict):
        for k, v in value.items():
            out |= _paths(v, f"{prefix}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out |= _paths(v, f"{prefix}[{i}]")
    return out


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory: pytest.TempPathFactory):
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    cfg = compose_train([*FAST, "model=lenet5", "quant=w8a8"], tmp_path_factory.mktemp("cfg"))
    GlobalHydra.instance().clear()
    return cfg


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(quant=recipes)
def test_random_recipes_build_or_fail_naming_the_field(quant: dict, base_cfg) -> None:
    cfg = copy.deepcopy(base_cfg)
    with open_dict(cfg):
        cfg.quant = OmegaConf.create({"enabled": True, **quant})
    try:
        parts = validate_config(cfg, check_data=False)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message, message
        named = _paths(quant, "quant") - {"quant"}
        # The key at fault, or (for an unknown one) its name in the list of unknown keys.
        assert any(p in message for p in named) or "['bitz']" in message, message
        return
    # Valid: it builds, round-trips, and prepares the model with every quantizer in range.
    recipe = parts.recipe
    assert isinstance(recipe, Recipe)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    qmodel = qat.prepare(parts.model, recipe)
    for _, q in qat.iter_quantizers(qmodel):
        assert q.spec.bits in (*QUANT_BITS, 16, 32)
        if q.role == "weight" and q.spec.enabled:
            assert q.spec.signed and q.spec.symmetric


# ---------------------------------------------------------------------- bad files
def test_a_corrupt_image_is_named_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    def boom(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(Trainer, "fit", boom)
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), 30 * i).save(root / name / f"{i}.png")
    bad = root / "a" / "2.png"
    bad.write_bytes(b"\x89PNG but not really")
    run_dir = tmp_path / "run"
    cfg = compose_train(
        [
            "data=imagefolder",
            f"data.data_dir={root}",
            "data.image_size=8",
            "data.in_channels=1",
            "data.num_workers=0",
            "model=lenet5",
            "logger=none",
        ],
        run_dir,
    )
    with pytest.raises(ConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith(f"data: 1 of 8 image files cannot be read: {bad} (")
    assert "Remove or replace them" in message and "data.check_images=false" in message
    assert "\n" not in message and not run_dir.exists()


# ---------------------------------------------------------------------- random numbers
# Random values for the numeric keys a user overrides most, as Hydra parses them from the
# command line (ints, floats, nan/inf, null, words), through train(cfg): the run either stops
# with one ConfigError line naming a key it was given, before any work, or finishes. lr stays
# below 0.2 when valid: a larger one can diverge, which is a training outcome (NonFiniteError
# naming the layer), not a config error.
EPOCH = st.one_of(st.integers(-2, 4).map(str), st.sampled_from(["null", "1.5", "two"]))
NUMERIC = {
    "trainer.max_epochs": st.one_of(st.integers(-2, 3).map(str), st.sampled_from(["null", "2.5"])),
    "optimizer.lr": st.sampled_from(["-1", "-0.0", "0", "1e-3", "0.1", "nan", "inf", "fast"]),
    "optimizer.weight_decay": st.sampled_from(["-1e-4", "0", "5e-4", "inf"]),
    "data.batch_size": st.sampled_from(["-1", "0", "1", "3", "32", "100000", "2.5", "null"]),
    "quant.bits": st.sampled_from(["-1", "0", "1", "2", "3", "4", "8", "9", "16", "32", "4.0"]),
    "schedule.warmup_epochs": EPOCH,
    "schedule.act_start_epoch": EPOCH,
    "schedule.weight_anneal.epochs": EPOCH,
    "schedule.act_anneal.epochs": EPOCH,
    "schedule.freeze_bn_epoch": EPOCH,
    "schedule.freeze_observer_epoch": EPOCH,
    "schedule.calibration_batches": st.sampled_from(["-1", "0", "1", "4"]),
}
numeric_overrides = st.dictionaries(
    st.sampled_from(sorted(NUMERIC)), st.none(), min_size=1, max_size=4
).flatmap(lambda keys: st.fixed_dictionaries({k: NUMERIC[k] for k in keys}))


def _named(key: str, message: str) -> bool:
    """``message`` names ``key`` (or, for a schedule anneal's field, the anneal)."""
    parent = key.rsplit(".", 1)[0]
    return key in message or (parent.count(".") >= 1 and parent in message)


def _numeric_overrides_fail_in_one_line_or_run(values: dict[str, str], root: Path) -> None:
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    run_dir = root / f"run{len(list(root.iterdir()))}"
    overrides = [f"{k}={v}" for k, v in values.items()]
    cfg = compose_train([*FAST, "model=lenet5", "logger=none", *overrides], run_dir)
    try:
        train(cfg)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message, message
        assert any(_named(k, message) for k in values), (values, message)
        assert not run_dir.exists(), "written before the config was validated"
        return
    assert json.loads((run_dir / "results.json").read_text())["status"] == "ok"


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=numeric_overrides)
def test_random_numeric_overrides_fail_in_one_line_or_run(values: dict, tmp_path: Path) -> None:
    _numeric_overrides_fail_in_one_line_or_run(values, tmp_path)


@pytest.mark.slow
@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=numeric_overrides)
def test_many_random_numeric_overrides_fail_in_one_line_or_run(
    values: dict, tmp_path: Path
) -> None:
    _numeric_overrides_fail_in_one_line_or_run(values, tmp_path)
