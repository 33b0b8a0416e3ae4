"""quant=auto: measured per-layer widths under a budget, trained, summarized and exported."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from lit_helpers import FAST, compose_train, refused_in_one_line
from onnx import numpy_helper

from qat.lit.config import ConfigError, validate_config
from qat.lit.config_parts import example_input
from qat.lit.quant_auto import auto_options, choose_bits
from qat.lit.summary import summary_rows
from qat.lit.train import train

REPO = Path(__file__).resolve().parents[2]
AUTO = [*FAST, "model=lenet5", "quant=auto", "quant.auto.batches=1"]


def _onnx_weight_levels(path: Path) -> list[int]:
    """Per Conv / Gemm / MatMul of the QDQ graph, in graph order: the largest |integer weight|
    (the int8 initializer its weight's DequantizeLinear reads)."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    levels = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        levels.append(int(np.abs(inits[dq.input[0]].astype(np.int32)).max()))
    return levels


@pytest.mark.slow  # ~50 s: measure, train, export both targets, verify
def test_auto_chooses_trains_and_exports_per_layer_bits(tmp_path: Path) -> None:
    cfg = compose_train(
        [
            *AUTO,
            "quant.bits=4",
            "quant.budget.match=size",  # the size of this preset's uniform W4A4 model
            "export.enabled=true",
            "export.bench=false",
        ],
        tmp_path,
    )
    train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "ok" and results["export"]["parity_ok"] is True
    for target in ("torchscript", "onnx"):
        assert results["export"]["parity"]["runtimes"][target]["agreement"] >= 0.999
    mixed = results["mixed_precision"]
    assert mixed["used"] <= mixed["budget"]
    chosen = {row["layer"]: row["bits"] for row in mixed["layers"]}
    assert len(set(chosen.values())) > 1, chosen  # a mixed model, not a uniform one
    # The run folder's overrides are the ones trained with: the preset's, then one per layer.
    saved = yaml.safe_load((tmp_path / "quant_overrides.yaml").read_text())["overrides"]
    assert {o["pattern"]: o["weight"]["bits"] for o in saved[-len(chosen) :]} == chosen
    assert (tmp_path / "sensitivity.png").stat().st_size > 0
    # The exported ONNX model holds each layer's weights on that layer's grid (8-bit weights
    # use the reduced range [-64, 63]; b < 8 bits: [-2^(b-1), 2^(b-1)-1]).
    top = [2 ** (b - 1) if b < 8 else 64 for b in chosen.values()]
    levels = _onnx_weight_levels(Path(results["export"]["artifacts"]["onnx"]))
    assert len(levels) == len(top)
    assert all(lv <= t for lv, t in zip(levels, top, strict=True)), (levels, chosen)
    assert any(lv > 8 for lv, b in zip(levels, chosen.values(), strict=True) if b == 8)
    # The summary lists every layer's width.
    rows = dict(summary_rows(results))
    assert "mixed precision" in rows
    assert all(f"  {name}" in rows for name in chosen)
    # A re-export or resume of the run rebuilds the recipe it trained with.
    again = validate_config(cfg, check_schedule=False)
    assert again.recipe is not None
    assert [o.pattern for o in again.recipe.overrides] == [o["pattern"] for o in saved]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["quant.budget.size_mb=0.0000001"],
            r"below the model with every layer at its cheapest candidate",
        ),
        (["+quant.budget.latency=3"], r"quant.budget has no key\(s\) \['latency'\]"),
        (["quant.budget.match=null"], r"quant=auto needs one budget, got none"),
        (["quant.budget.size_mb=1", "quant.budget.bops=5"], r"needs one budget, got 2"),
        (["quant.budget.match=speed"], r"quant.budget.match='speed' is invalid"),
        (["quant.budget.size_mb=1", "quant.auto.candidates=[4]"], r"candidates=\[4\]"),
        (["quant.budget.latency_ms=5"], r"latency_ms needs the export target it is measured on"),
        (
            ["quant.budget.latency_ms=5", "quant.budget.target=tflite"],
            r"one of onnx, torchscript \(got 'tflite'\)",
        ),
        (
            ["quant.budget.size_mb=1", "quant.budget.target=onnx"],
            r"target='onnx' applies to a latency budget only",
        ),
        (["quant.auto.context=all"], r"quant.auto.context='all' is invalid"),
        (["quant.auto.candidates=[4g33,8]"], r"candidates=\['4g33', 8\] is invalid"),
        # lenet5's convs have 4-D weights: weight groups are for linear layers.
        (["quant.auto.candidates=[4g32,8]"], r"layer 'stem.0' .* takes no weight groups"),
        (
            [
                "quant.budget.latency_ms=5",
                "quant.budget.target=onnx",
                "quant.auto.candidates=[4g32,8]",
            ],
            r"a latency budget takes plain bit widths",
        ),
    ],
)
def test_bad_budgets_fail_in_validation(extra: list[str], message: str, tmp_path: Path) -> None:
    cfg = compose_train([*AUTO, *extra], tmp_path)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)
    assert not (tmp_path / "quant_overrides.yaml").exists()


def test_latency_budget_is_timed_on_the_target(tmp_path: Path) -> None:
    extra = ["quant.budget.target=onnx", "quant.auto.candidates=[4,8]"]
    cfg = compose_train([*AUTO, *extra, "quant.budget.latency_ms=1000"], tmp_path)
    parts, opts = validate_config(cfg), auto_options(cfg.quant)
    assert opts is not None and opts.cost == "latency" and opts.target == "onnx"
    example = example_input(parts.datamodule)
    recipe, report = choose_bits(
        opts, parts.model, parts.recipe, parts.datamodule, example, tmp_path
    )
    measured = json.loads((tmp_path / "latency.json").read_text())
    # Both widths exported and timed; every layer at the highest, which meets 1 s.
    assert set(measured["ms_by_bits"]) == {"4", "8"} and measured["bits"] == 8
    assert all(0 < ms < 1000 for ms in measured["ms_by_bits"].values())
    assert {row["bits"] for row in report["layers"]} == {8} and report["used"] <= 1000
    chosen = yaml.safe_load((tmp_path / "quant_overrides.yaml").read_text())["overrides"]
    assert [o["pattern"] for o in chosen][-len(report["layers"]) :] == [
        row["layer"] for row in report["layers"]
    ]
    assert len(recipe.overrides) == len(chosen)
    # A budget the int8 model misses: one line naming what was measured.
    tight = dataclasses.replace(opts, budget=1e-6)
    with pytest.raises(ConfigError, match=r"latency_ms=1e-06 is below the model exported to onnx"):
        choose_bits(tight, parts.model, parts.recipe, parts.datamodule, example, tmp_path / "t")


@pytest.mark.slow  # a fresh process (~15 s); the messages are checked in-process above
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("quant.budget.size_mb=0.0000001", "quant.budget.size_mb=1e-07 is below"),
        ("quant.budget.latency_ms=5", "latency_ms needs the export target"),
        ("quant.auto.candidates=[4g32,8]", "takes no weight groups"),
    ],
)
def test_bad_budget_is_one_line_and_exit_2(bad: str, message: str, tmp_path: Path) -> None:
    assert message in refused_in_one_line([*AUTO, bad], tmp_path)


def test_wandb_gets_the_per_layer_bits_table(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from lightning.pytorch.loggers import WandbLogger

    from qat.lit.wandb_report import log_results_to_wandb

    logged: dict = {}

    class Run:
        def __init__(self) -> None:
            self.summary: dict = {}

        def log(self, data: dict) -> None:
            logged.update(data)

        def log_artifact(self, artifact: object) -> None:
            pass

    class Logger(WandbLogger):
        def __init__(self) -> None:  # no wandb run: the experiment is the fake above
            pass

        @property
        def experiment(self) -> Run:
            return Run()

    fake = types.SimpleNamespace(
        Table=lambda columns, data: ("table", columns, data),
        Image=lambda path: ("image", path),
        Artifact=lambda **kw: types.SimpleNamespace(add_file=lambda path: None),
        finish=lambda: None,
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    plot = tmp_path / "sensitivity.png"
    plot.write_bytes(b"png")
    layer = {"layer": "stem.0", "bits": 8, "weights": 144, "macs": 9, "loss_delta_chosen": 0.0}
    results = {
        "metrics": {"test_acc": 0.5},
        "bits": {"weight": 2, "activation": 2},
        "run_dir": str(tmp_path),
        "task_name": "t",
        "mixed_precision": {
            "layers": [layer, {**layer, "layer": "fc", "bits": 2}],
            "plot": str(plot),
        },
    }
    log_results_to_wandb(types.SimpleNamespace(loggers=[Logger()]), results)
    kind, columns, data = logged["mixed_precision/bits"]
    assert kind == "table" and columns[:2] == ["layer", "bits"]
    assert [row[:2] for row in data] == [["stem.0", 8], ["fc", 2]]
    assert logged["mixed_precision/sensitivity"] == ("image", str(plot))
