"""The Hydra configs compose, and bad overrides fail before any training with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from lit_helpers import CONFIG_DIR, FAST, compose_train
from omegaconf import OmegaConf

from qat.lit.config import ConfigError, build_recipe, validate_config
from qat.quant.schedule import Schedule

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
QUANT_PRESETS = sorted(p.stem for p in (CONFIG_DIR / "quant").glob("*.yaml"))


def test_groups_listed_in_the_design_exist() -> None:
    for group in (
        "data",
        "model",
        "quant",
        "schedule",
        "trainer",
        "logger",
        "callbacks",
        "export",
        "paths",
        "hydra",
        "hparams_search",
        "debug",
        "experiment",
    ):
        assert (CONFIG_DIR / group).is_dir(), group
    assert {"resnet_int8", "resnet_int4", "resnet_w4a8", "mobilenet_int8", "quick"} <= set(
        EXPERIMENTS
    )
    assert {"w8a8", "w4a4", "w4a8", "w2a2", "lsq", "pact", "none", "float"} <= set(QUANT_PRESETS)
    for name in ("fashion_mnist", "digits", "cifar10", "imagefolder"):
        assert (CONFIG_DIR / "data" / f"{name}.yaml").is_file()
    for name in ("resnet20", "resnet32", "resnet56", "resnet18", "mobilenetv2", "lenet5"):
        assert (CONFIG_DIR / "model" / f"{name}.yaml").is_file()
    for name in ("cpu", "gpu", "ddp", "ddp_cpu"):
        assert (CONFIG_DIR / "trainer" / f"{name}.yaml").is_file()
    for name in ("csv", "wandb", "tensorboard", "none"):
        assert (CONFIG_DIR / "logger" / f"{name}.yaml").is_file()


def test_defaults(tmp_path: Path) -> None:
    cfg = compose_train([], tmp_path)
    assert cfg.data._target_.endswith("FashionMNISTDataModule")
    assert cfg.model.name == "resnet20"
    assert cfg.model.in_channels == 1 and cfg.model.num_classes == 10
    assert cfg.quant.bits == 8 and cfg.quant.weight.bits == 8
    assert cfg.callbacks.model_checkpoint.filename == "last"
    assert cfg.callbacks.best_checkpoint.monitor == "val/acc"
    assert "qat" in cfg.callbacks and "rich_progress_bar" in cfg.callbacks
    assert cfg.optimized_metric == "val/acc"
    assert "experiment" not in cfg


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name: str, tmp_path: Path, fashion_data: str) -> None:
    # fashion_data: the experiments' Fashion-MNIST as tiny IDX files (no package, no download);
    # the language models (gpt_*) read the stdlib's sources, the hf_* ones a tiny saved
    # Hugging Face folder's tokenizer on a slice of them.
    lm = name.startswith(("gpt_", "hf_"))
    extra = [] if lm else [fashion_data]
    if name.startswith("hf_"):
        from hf_folder import make_hf_folder

        folder = make_hf_folder(tmp_path / "hf")
        extra = [f"model.path={folder}", "data.seq_len=32", "data.max_bytes=60000"]
        extra += ["data.val_bytes=6000", "data.test_bytes=6000"]
    cfg = compose_train([f"+experiment={name}", *extra], tmp_path)
    assert cfg.task_name == name
    assert cfg.task == ("language_model" if lm else "classification")
    schedule = Schedule.from_dict(cfg.schedule)
    # Every scheduled change happens within the run.
    assert schedule.end_epoch() < cfg.trainer.max_epochs
    recipe = build_recipe(cfg.quant)
    assert (recipe is None) == (name == "gpt_float")  # the float LM every LM row starts from
    # Cheap checks only (the data files are found but not loaded here).
    validate_config(cfg)


def test_resnet_int4_keeps_first_and_last_layer_at_8_bits(
    tmp_path: Path, fashion_data: str
) -> None:
    cfg = compose_train(["+experiment=resnet_int4", fashion_data], tmp_path)
    parts = validate_config(cfg)
    assert parts.recipe is not None
    assert parts.recipe.weight.bits == 4 and parts.recipe.activation.bits == 4
    import qat

    model = qat.prepare(parts.model, parts.recipe)
    bits = {name: q.spec.bits for name, q in qat.iter_quantizers(model)}
    assert bits["stem.0.weight_quant"] == 8
    assert bits["fc.weight_quant"] == 8
    assert bits["input_quant"] == 8
    assert bits["pool.output_quant"] == 8
    assert bits["layer2.0.conv1.0.weight_quant"] == 4
    assert bits["layer2.0.conv1.0.output_quant"] == 4
    assert cfg.schedule.weight_anneal.start_bits == 8


@pytest.mark.parametrize("preset", QUANT_PRESETS)
def test_quant_presets_build_recipes(preset: str, tmp_path: Path) -> None:
    # The language-model presets (dynamic / weight-only) with the LM experiment's task and data.
    lm = ["+experiment=gpt_float"] if preset.startswith("lm_") or preset == "auto_lm" else []
    if preset.startswith(("lm_q4_k", "lm_q6_k")):  # k-quant blocks of 256: a d_model they fit
        lm.append("model.d_model=256")
    if preset == "lm_q4_k_m":  # its overrides name Llama modules (tests/export/test_gguf_*)
        lm.append("quant.overrides=[]")
    cfg = compose_train([*lm, f"quant={preset}"], tmp_path)
    recipe = build_recipe(cfg.quant)
    if preset in ("none", "float"):
        assert recipe is None
    else:
        assert recipe is not None
        validate_config(cfg, check_data=False)


@pytest.mark.parametrize("bits", [8, 6, 4, 3, 2])
@pytest.mark.parametrize("preset", ["w8a8", "w4a4", "lsq"])
def test_quant_bits_shortcut_sweeps_the_bit_width(bits: int, preset: str, tmp_path: Path) -> None:
    cfg = compose_train([f"quant={preset}", f"quant.bits={bits}"], tmp_path)
    recipe = build_recipe(cfg.quant)
    assert recipe is not None
    assert recipe.weight.bits == bits and recipe.activation.bits == bits


def test_w4a8_sweeps_weights_only(tmp_path: Path) -> None:
    recipe = build_recipe(compose_train(["quant=w4a8", "quant.bits=3"], tmp_path).quant)
    assert recipe is not None and (recipe.weight.bits, recipe.activation.bits) == (3, 8)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["quant.bits=1"], r"quant\.bits=1 is invalid"),
        (["quant.bits=9"], r"quant\.bits=9 is invalid"),
        (["quant.weight.bits=1"], r"quant\.weight\.bits=1"),
        (["quant.activation.range_method=median"], "range_method"),
        (["model.name=resnet99"], r"unknown model 'resnet99'.*resnet20"),
        (["data=cifar10", "data.data_dir=/nonexistent/qat"], "CIFAR-10 not found"),
        (["data=imagefolder", "data.data_dir=/nonexistent/qat"], "no class folders"),
        (["data=digits", "model.in_channels=3"], r"model\.in_channels=3 does not match"),
        (["data=digits", "data.in_channels=3"], r"data\.in_channels=3 does not match"),
        (["data=digits", "model=lenet5", "model.image_size=16"], "image_size=16"),
        (["data=digits", "model=mobilenetv2", "quant=pact"], "matches no quantizable layer"),
        (["schedule.act_start_epoch=0", "schedule.warmup_epochs=2"], "act_start_epoch"),
        (["export.targets=[tflite]"], r"export\.targets"),
    ],
)
def test_bad_overrides_fail_with_a_clear_message(
    overrides: list[str], match: str, tmp_path: Path, fashion_data: str
) -> None:
    # The default data (Fashion-MNIST) from tiny files; a case's own data.data_dir comes later
    # and wins.
    cfg = compose_train([fashion_data, *overrides], tmp_path)
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("export.float_islands=float16", r"export\.float_islands='float16' is invalid"),
        ("export.accuracy_level=5", r"export\.accuracy_level=5 is invalid"),
    ],
)
def test_bad_lm_export_options_fail_before_training(
    override: str, match: str, tmp_path: Path
) -> None:
    cfg = compose_train(["+experiment=gpt_int4", override], tmp_path)
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg)


def test_imagefolder_num_classes_comes_from_the_folders(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b", "c"):
            folder = tmp_path / "imgs" / split / cls
            folder.mkdir(parents=True)
            Image.new("RGB", (12, 12), (10, 20, 30)).save(folder / "x.png")
    cfg = compose_train(
        ["data=imagefolder", f"data.data_dir={tmp_path / 'imgs'}", "model=lenet5"], tmp_path
    )
    parts = validate_config(cfg)
    assert cfg.data.num_classes == 3 and parts.model.num_classes == 3


def test_hparams_search_and_slurm_launcher_compose(tmp_path: Path) -> None:
    cfg = compose_train(["hparams_search=bits_optuna", "hydra/launcher=slurm"], tmp_path)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize"
    assert "quant.bits" in sweeper.params and "optimizer.lr" in sweeper.params
    assert cfg.optimized_metric == "val/acc"
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert {"partition", "timeout_min", "gpus_per_node"} <= set(launcher)
    cfg = compose_train(["hydra/launcher=submitit_slurm"], tmp_path)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")


def test_run_dirs_are_unique_per_run(tmp_path: Path) -> None:
    cfg = compose_train([], tmp_path)
    raw = OmegaConf.to_container(cfg.hydra, resolve=False)
    # Microseconds in the run dir: two runs started in the same second never share it.
    assert "%f" in raw["run"]["dir"] and "%f" in raw["sweep"]["dir"]
    assert "job.num" in raw["sweep"]["subdir"]


def test_optimizer_and_scheduler_are_partials(tmp_path: Path) -> None:
    import torch

    cfg = compose_train(["scheduler=onecycle"], tmp_path)
    opt = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.SGD)
    sched = instantiate(cfg.scheduler)(opt, total_steps=10)
    assert isinstance(sched, torch.optim.lr_scheduler.OneCycleLR)


def test_debug_presets_compose(tmp_path: Path) -> None:
    for name in ("default", "fdr", "overfit", "limit"):
        cfg = compose_train([f"debug={name}", *FAST[:1]], tmp_path)
        assert cfg.task_name == "debug"
        assert cfg.export.enabled is False


TABLE_ROWS = sorted(
    p.stem
    for p in (CONFIG_DIR / "experiment" / "table").glob("*.yaml")
    if not p.stem.startswith("_")
)


@pytest.mark.parametrize("row", TABLE_ROWS)
def test_results_table_rows_pass_the_config_check(row: str, tmp_path: Path) -> None:
    # scripts/results.py runs each row with init_from= (not loaded by the check); a row whose
    # schedule the check refuses would fail only after its float model trained.
    cfg = compose_train(
        [f"+experiment=table/{row}", "model=resnet20", "init_from=float.ckpt"], tmp_path
    )
    assert cfg.task_name == f"table_{row}"
    validate_config(cfg, check_data=False)
