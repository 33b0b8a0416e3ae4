"""``export.targets=[hf]``: the compressed-tensors checkpoint that ``transformers`` loads back
computes the fake-quant model's logits (int4 weight-only per group, W8A8 with dynamic inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_folder import make_hf_folder
from lm_helpers import fake_quant_hf, w8da8_per_tensor

from qat.export.hf_checkpoint import export_hf_checkpoint, load_hf_checkpoint
from qat.export.lm_io import logits_of

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize(
    "recipe,formats,inputs",
    [
        ("lm_w4g32", {"pack-quantized", "int-quantized"}, None),  # lm_head: 8-bit
        # +experiment=hf_w8a8's grid: per-tensor, the one compressed-tensors rounds as qat does
        ("w8da8_per_tensor", {"int-quantized"}, {"strategy": "tensor", "symmetric": False}),
    ],
)
def test_transformers_loads_the_fake_quant_model_back(
    hf_dir: Path, tmp_path: Path, recipe: str, formats: set[str], inputs: dict | None
) -> None:
    qmodel = fake_quant_hf(
        hf_dir, w8da8_per_tensor() if recipe == "w8da8_per_tensor" else recipe, steps=3
    )
    out = export_hf_checkpoint(qmodel, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    groups = config["config_groups"].values()
    assert {g["format"] for g in groups} == formats
    targets = [t for g in groups for t in g["targets"]]
    assert "model.layers.0.self_attn.q_proj" in targets and "lm_head" in targets
    assert config["ignore"] == ["model.embed_tokens"]  # stored as its fake-quant weight
    for g in groups:
        got = g["input_activations"]
        assert (got is None) if inputs is None else {k: got[k] for k in inputs} == inputs
    # The tokenizer travels with the checkpoint.
    assert (out / "tokenizer.json").is_file()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        if "pack-quantized" in formats:
            packed = f.get_tensor("model.layers.0.mlp.up_proj.weight_packed")
            assert packed.dtype == torch.int32 and packed.shape == (128, 64 * 4 // 32)
        else:
            assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.int8
    assert not any("_quant." in k for k in keys)  # no quantizer state
    run = load_hf_checkpoint(out)
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = logits_of(qmodel, ids)
    torch.testing.assert_close(run(ids), expected, atol=1e-5, rtol=0)


def test_gpt2_conv1d_layers_are_kept_as_their_fake_quant_weights(tmp_path: Path) -> None:
    path = make_hf_folder(tmp_path / "gpt2", family="gpt2", tokenizer=False)
    qmodel = fake_quant_hf(path, "lm_w4g32", steps=0)
    out = export_hf_checkpoint(qmodel, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "transformer.h.0.attn.c_attn" in config["ignore"]
    ids = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        expected = logits_of(qmodel, ids)
    torch.testing.assert_close(load_hf_checkpoint(out)(ids), expected, atol=1e-5, rtol=0)


def test_a_model_of_qat_is_refused(tmp_path: Path) -> None:
    from qat.models import create_model

    with pytest.raises(ValueError, match=r"GPT is not a transformers model"):
        export_hf_checkpoint(create_model("gpt", vocab_size=256), tmp_path)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["+experiment=hf_q4_0", "export.targets=[gguf,hf]"], r"grid=q8_0 .*no exact"),
        (["+experiment=hf_w4g32", "quant=lm_8da4w"], r"dynamic=token .*no exact"),
        (["+experiment=gpt_int4", "export.targets=[hf]"], r"the model is GPT: use model=hf"),
    ],
)
def test_hf_target_refused_where_transformers_would_compute_otherwise(
    hf_dir: Path, tmp_path: Path, overrides: list[str], match: str
) -> None:
    from lit_helpers import compose_train

    from qat.lit.config import ConfigError, validate_config

    path = [f"model.path={hf_dir}"] if "hf_" in overrides[0] else []
    small = [
        "data.seq_len=32",
        "data.max_bytes=60000",
        "data.val_bytes=6000",
        "data.test_bytes=6000",
    ]
    with pytest.raises(ConfigError, match=match):
        validate_config(compose_train([*overrides, *path, *small], tmp_path))
