"""quant=auto_lm: the gpt's per-layer weight widths *and group sizes* chosen by measurement,
trained with and exported to ONNX (MatMulNBits per layer at its own block size)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
import yaml
from lit_helpers import HF_TINY, compose_train, refused_in_one_line

from qat.lit.config import validate_config
from qat.lit.errors import ConfigError
from qat.lit.train import train
from qat.quant.sensitivity import parse_candidate

#: A 1-block gpt (d 64: every linear's input size is 64 or 256) on a little stdlib text.
GPT = [
    "model=gpt",
    "data=text",
    "task=language_model",
    "export=lm",
    "quant=auto_lm",
    "export.targets=[onnx]",
    "model.d_model=64",
    "model.n_layers=1",
    "model.n_heads=2",
    "data.max_bytes=200000",
    "trainer.max_epochs=1",
    *HF_TINY,
    "trainer.limit_train_batches=20",
]
LINEARS = ("MatMulNBits", "MatMul", "MatMulInteger", "DynamicQuantizeMatMul")
REPO = Path(__file__).resolve().parents[2]


def test_a_group_size_that_does_not_divide_a_layer_is_refused_before_any_work(
    tmp_path: Path,
) -> None:
    cfg = compose_train(GPT, tmp_path)  # auto_lm's candidates include 4g128: 128 ∤ 64
    match = r"group size 128 does not divide the input size 64 of layer 'blocks.0.attn.qkv'"
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg)
    assert not (tmp_path / "quant_overrides.yaml").exists()


@pytest.mark.slow  # a fresh process (~15 s); the message is checked in-process above
def test_the_refusal_is_one_line_and_exit_2(tmp_path: Path) -> None:
    assert "group size 128 does not divide" in refused_in_one_line(GPT, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow  # ~20 s: measure, train 20 steps, export and verify ONNX
def test_auto_lm_trains_and_exports_each_layers_bits_and_group_size(tmp_path: Path) -> None:
    train(compose_train([*GPT, "quant.auto.candidates=[4g32,4g64,4g0,8g0]"], tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "ok" and results["export"]["parity_ok"] is True
    assert results["export"]["parity"]["runtimes"]["onnx"]["agreement"] >= 0.999
    mixed = results["mixed_precision"]
    assert mixed["used"] <= mixed["budget"]
    chosen = {row["layer"]: parse_candidate(row["bits"]) for row in mixed["layers"]}
    assert len(set(chosen.values())) > 1, chosen  # mixed, not one grid everywhere
    # The run folder's overrides: one per layer with its bits and group size.
    saved = yaml.safe_load((tmp_path / "quant_overrides.yaml").read_text())["overrides"]
    assert {o["pattern"]: (o["weight"]["bits"], o["weight"]["group_size"]) for o in saved[1:]} == (
        chosen
    )
    # Trained with them: each weight quantizer's width and number of scales in the checkpoint.
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    inputs = {}
    for name, (bits, group) in chosen.items():
        rows, inputs[name] = state[f"model.{name}.weight"].shape
        assert int(state[f"model.{name}.weight_quant.bit_width"]) == bits
        scales = rows * inputs[name] // group if group else rows
        assert state[f"model.{name}.weight_quant.scale"].numel() == scales, name
    # Exported with them: a layer with groups smaller than its input runs MatMulNBits at that
    # block size and width; a per-channel one (or one group per row) another kernel.
    graph = onnx.load(results["export"]["artifacts"]["onnx"]).graph
    nodes = [n for n in graph.node if n.op_type in LINEARS]
    assert len(nodes) == len(chosen)
    for node, (name, (bits, group)) in zip(nodes, chosen.items(), strict=True):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if 0 < group < inputs[name]:
            assert node.op_type == "MatMulNBits", (name, node.op_type)
            assert (attrs["bits"], attrs["block_size"]) == (bits, group), (name, attrs)
        else:
            assert node.op_type != "MatMulNBits", (name, attrs)
