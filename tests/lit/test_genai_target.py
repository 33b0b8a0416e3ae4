"""``export.targets=[genai]`` in a run: the onnxruntime-genai folder is written, verified
against the fake-quant model like the other targets, and refused up front where it cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lit_helpers import HF_TINY, compose_train

from qat.lit.config import validate_config
from qat.lit.errors import ConfigError
from qat.lit.train import train

TINY = [*HF_TINY, "data.max_bytes=60000"]


def test_hf_w4g32_exports_a_genai_folder_that_agrees(hf_dir: Path, tmp_path: Path) -> None:
    overrides = ["+experiment=hf_w4g32", f"model.path={hf_dir}", "export.targets=[genai]", *TINY]
    train(compose_train(overrides, tmp_path / "run"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "ok"
    export = results["export"]
    folder = Path(export["artifacts"]["genai"])
    assert (folder / "genai_config.json").is_file() and (folder / "tokenizer.json").is_file()
    genai = export["parity"]["runtimes"]["genai"]
    # Exact int4 weights, float activations: the same logits up to float32 rounding.
    assert genai["agreement"] == 1.0 and genai["max_abs_diff"] < 1e-3
    assert export["parity_ok"]


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model=gpt", "quant=lm_w4g32"], "genai builds on a Hugging Face model"),
        (["+experiment=hf_w4g32", "quant=lm_8da4w"], "dynamic=token .* no kernel in the genai"),
        (["+experiment=hf_q4_0", "+export.genai_q8_ops=3"], "genai_q8_ops=3 is invalid"),
    ],
)
def test_genai_target_is_refused_before_training(
    hf_dir: Path, tmp_path: Path, overrides: list[str], match: str
) -> None:
    if overrides[0].startswith("+experiment"):
        overrides = [*overrides, f"model.path={hf_dir}"]
    else:
        overrides = [*overrides, "data=text", "task=language_model", "export=lm"]
    cfg = compose_train([*overrides, "export.targets=[genai]", *TINY], tmp_path / "run")
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg, check_data=False, check_schedule=False)
