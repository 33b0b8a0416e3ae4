"""The README's commands, Python example and tables still match the code and the configs.

- every ``python train.py ...`` command in its bash blocks composes (Hydra's compose API, as
  ``train.py`` would) and passes the config validation that ``train(cfg)`` runs before any work
  (without looking for data files); every ``python -m qat.export ...`` command composes;
- the Python block runs as written, on a few batches of digits;
- every ``qat.*`` name it mentions exists;
- the config-group table lists exactly the groups and options in ``configs/``;
- the results table copies its figures from ``docs/results.md`` faithfully.
"""

from __future__ import annotations

import fnmatch
import importlib
import itertools
import re
import shlex
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from lit_helpers import CONFIG_DIR, REPO, compose_train

README = REPO / "README.md"
#: The README's Python example lives on its own page; the checks read both.
PYTHON_API = REPO / "docs" / "python_api.md"
RESULTS = REPO / "docs" / "results.md"

#: Keys whose README value may be a placeholder (``<run>``, ``<float ckpt>``): paths the
#: commands only read when they run, which config validation does not open, and the class of
#: a model of your own, validated with a torchvision-style test model in its place, and your
#: Hugging Face folder (``model.path``), validated with the tests' tiny Llama folder in its place.
PLACEHOLDER_KEYS = ("ckpt_path", "init_from", "hydra.run.dir", "model._target_", "model.path")
DUMMY = "placeholder"
#: What stands for ``model._target_=<your_package.YourNet>`` (tests/helpers/zoo.py).
YOUR_MODEL = "model._target_=zoo.resnet_basic"


def _text() -> str:
    return README.read_text() + "\n" + PYTHON_API.read_text()


def code_blocks(lang: str) -> list[str]:
    """The bodies of the README's fenced code blocks in ``lang``."""
    return re.findall(rf"^```{lang}\n(.*?)^```", _text(), flags=re.M | re.S)


def commands(program: str) -> list[list[str]]:
    """The arguments of every ``program ...`` command in the bash blocks (``&&`` chains split)."""
    found = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            line = re.sub(r"<[^>]+>", DUMMY, line)
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                n = len(program.split())
                if words[:n] == program.split():
                    found.append(words[n:])
    return found


def check_placeholders(args: list[str]) -> None:
    for arg in args:
        key, _, value = arg.partition("=")
        if DUMMY in value:
            assert key in PLACEHOLDER_KEYS, f"README: placeholder in {arg!r}, a key that is read"


def sweep_jobs(args: list[str]) -> list[list[str]]:
    """One override list per job of ``python train.py -m ...`` (``args`` itself without ``-m``)."""
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    if len(overrides) == len(args):
        return [overrides]
    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(job) for job in itertools.product(*choices)]


TRAIN_COMMANDS = commands("python train.py")
EXPORT_COMMANDS = commands("python -m qat.export")


def test_readme_has_the_commands() -> None:
    joined = [" ".join(c) for c in TRAIN_COMMANDS]
    assert "+experiment=quick" in joined
    for needle in ("-m ", "hydra/launcher=slurm", "hparams_search=bits_optuna", "logger=wandb"):
        assert any(needle in c for c in joined), needle
    assert EXPORT_COMMANDS, "README: no `python -m qat.export ...` command"


@pytest.fixture(scope="module")
def kquant_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama folder whose every input size is a multiple of the k-quants' 256 block."""
    import transformers
    from hf_folder import make_hf_config, train_bpe

    cfg = make_hf_config("llama", hidden=256)
    cfg.intermediate_size = 512
    path = tmp_path_factory.mktemp("hf") / "kquant-llama"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    train_bpe(cfg.vocab_size).save_pretrained(path)
    return path


@pytest.mark.parametrize("args", TRAIN_COMMANDS, ids=" ".join)
def test_train_command_composes_and_validates(
    args: list[str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from qat.lit.config import validate_config

    check_placeholders(args)
    args = [YOUR_MODEL if a == f"model._target_={DUMMY}" else a for a in args]
    if any(a.startswith("model.path=") for a in args):  # the folder a command names, or yours
        kquant = any(a.startswith(("quant=lm_q4_k", "quant=lm_q6_k")) for a in args)
        hf_dir = request.getfixturevalue("kquant_hf_dir" if kquant else "hf_dir")
        args = [f"model.path={hf_dir}" if a.startswith("model.path=") else a for a in args]
    for overrides in sweep_jobs(args):
        cfg = compose_train(overrides, tmp_path)
        # What train(cfg) checks first (recipe, schedule, export targets, model, a dry-run
        # prepare), without looking for the data files.
        validate_config(cfg, check_data=False)


@pytest.mark.parametrize("args", EXPORT_COMMANDS, ids=" ".join)
def test_export_command_composes(args: list[str]) -> None:
    check_placeholders(args)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("export_ckpt", overrides=args)
    assert cfg.ckpt_path and cfg.export.enabled


def test_python_block_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The Python example, as written, on 2 training batches and 1 val / test batch of digits:
    it prints its progress and the parity report, and snaps biases and exports on test images."""
    import qat
    import qat.data

    (block,) = code_blocks("python")
    steps = ["qat.prepare", "qat.calibrate", "qat.snap_bias", "export_model", "verify_artifacts"]
    at = [block.index(step + "(") for step in steps]
    assert at == sorted(at), f"README: the Python block should run {' → '.join(steps)}"

    class TinyDigits(qat.data.DigitsDataModule):
        def train_dataloader(self) -> list:
            return list(itertools.islice(super().train_dataloader(), 2))

        def val_dataloader(self) -> list:
            return list(itertools.islice(super().val_dataloader(), 1))

        def test_dataloader(self) -> list:
            return list(itertools.islice(super().test_dataloader(), 1))

    snapped_on = []
    snap_bias = qat.snap_bias

    def recording_snap_bias(model, example):
        snapped_on.append(example)
        return snap_bias(model, example)

    monkeypatch.setattr(qat.data, "DigitsDataModule", TinyDigits)
    monkeypatch.setattr(qat, "snap_bias", recording_snap_bias)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # check_parity raises on disagreement
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["model.onnx", "model.ts"]
    assert namespace["report"]["num_samples"] == 64
    # The training loop's `x` must not stand in for the test batch (it did once).
    test_images = namespace["dm"].test_dataloader()[0][0]
    (example,) = snapped_on
    assert torch.equal(example, test_images[:8])
    out = capsys.readouterr().out
    assert re.findall(r"^epoch (\d): (\d)-bit, train loss [\d.]+, val acc [\d.]+%$", out, re.M) == [
        ("0", "8"),
        ("1", "6"),
        ("2", "4"),
    ]
    for runtime in ("torchscript", "onnx"):
        assert re.search(rf"^{runtime}: test acc [\d.]+%, top-1 agreement .* 100\.00%", out, re.M)


def test_qat_names_exist() -> None:
    names = set(re.findall(r"`(qat(?:\.\w+)+)", _text()))
    assert "qat.lit.QATCallback" in names
    for name in sorted(names):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ModuleNotFoundError:
                continue
            for attr in parts[i:]:
                assert hasattr(obj, attr), f"README mentions {name}: {attr!r} does not exist"
                obj = getattr(obj, attr)
            break


def table(heading: str, text: str) -> list[list[str]]:
    """The rows (cells) of the first Markdown table whose header row starts with ``heading``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in itertools.takewhile(lambda s: s.startswith("|"), lines[start + 2 :]):
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def config_options() -> dict[str, set[str]]:
    """``{group: options}`` under configs/ (experiments by their path; ``_base`` files left out)."""
    groups: dict[str, set[str]] = {}
    for path in CONFIG_DIR.rglob("*.yaml"):
        rel = path.relative_to(CONFIG_DIR).with_suffix("")
        if len(rel.parts) == 1 or rel.name.startswith("_"):
            continue  # primary configs (train, export_ckpt), shared bases of experiments
        if rel.parts[0] == "experiment":
            group, option = "experiment", "/".join(rel.parts[1:])
        else:
            group, option = "/".join(rel.parts[:-1]), rel.name
        groups.setdefault(group, set()).add(option)
    return groups


def test_config_table_lists_every_group_and_option() -> None:
    actual = config_options()
    listed = {}
    for cells in table("| group | options |", _text()):
        (group,) = re.findall(r"`([^`]+)`", cells[0])
        # Option names only: `key=value` examples and dotted keys are not options.
        listed[group] = [
            t for t in re.findall(r"`([^`]+)`", cells[1]) if re.fullmatch(r"[\w/*]+", t)
        ]
    assert sorted(listed) == sorted(actual), "README config table: groups differ from configs/"
    for group, tokens in listed.items():
        covered = set()
        for token in tokens:
            matched = fnmatch.filter(actual[group], token)
            assert matched, f"README config table: {group}={token} is not in configs/{group}/"
            covered.update(matched)
        assert covered == actual[group], (
            f"README config table: {group} does not list {sorted(actual[group] - covered)}"
        )


def test_results_table_copies_docs_results() -> None:
    source = {}
    for cells in table("| model | method | bits |", RESULTS.read_text()):
        model, method, bits = cells[0], cells[1].replace("†", "").strip(), cells[2]
        source[(model, method, bits)] = (cells[4], cells[7])  # fake-quant %, agree %
    rows = table("| method | bits | ResNet-20 % |", _text())
    assert len(rows) >= 4
    for method, bits, r20, r20_agree, mnv2, mnv2_agree in rows:
        for model, figures in (("resnet20", (r20, r20_agree)), ("mobilenetv2", (mnv2, mnv2_agree))):
            assert (model, method, bits) in source, f"README results: no {model} {method} {bits}"
            assert figures == source[(model, method, bits)], (
                f"README results: {model} {method} {bits} reads {figures}, docs/results.md "
                f"{source[(model, method, bits)]}"
            )
