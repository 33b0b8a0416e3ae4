"""``model=hf``: a local Hugging Face causal LM folder, loaded offline; bad folders refused in
one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from lit_helpers import compose_train

from qat.export.lm_io import logits_of
from qat.lit.config import ConfigError, validate_config
from qat.models.hf import load_hf_causal_lm

transformers = pytest.importorskip("transformers")


#: A small slice of the text: validation tokenizes it before building the model.
SMALL_TEXT = [
    "data.seq_len=32",
    "data.max_bytes=60000",
    "data.val_bytes=6000",
    "data.test_bytes=6000",
]


def test_loads_the_saved_weights_in_the_dtype_asked(hf_dir: Path) -> None:
    saved = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    saved.eval()
    model = load_hf_causal_lm(str(hf_dir))
    assert model.training and model.config.use_cache is False
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(logits_of(model.eval(), ids), logits_of(saved, ids))
    half = load_hf_causal_lm(str(hf_dir), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_gradient_checkpointing_gives_the_same_gradients(hf_dir: Path) -> None:
    ids = torch.randint(0, 512, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = load_hf_causal_lm(str(hf_dir), gradient_checkpointing=checkpointing)
        flag = getattr(model, "is_activation_checkpointing", None)
        assert (model.is_gradient_checkpointing if flag is None else flag) == checkpointing
        logits_of(model, ids).float().logsumexp(-1).mean().backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_folders_are_one_line(tmp_path: Path, hf_dir: Path) -> None:
    def refused(path: Path | str, extra: tuple[str, ...] = ()) -> str:
        overrides = ["+experiment=hf_q4_0", f"model.path={path}", *SMALL_TEXT, *extra]
        cfg = compose_train(overrides, tmp_path / "r")
        with pytest.raises(ConfigError) as info:
            validate_config(cfg)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "no such folder" in refused(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no tokenizer" in refused(empty)  # the data reads the folder first
    no_config = tmp_path / "no-config"
    shutil.copytree(hf_dir, no_config)
    (no_config / "config.json").unlink()
    assert "has no config.json" in refused(no_config)
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(hf_dir, no_tok)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / name).unlink()
    assert "has no tokenizer" in refused(no_tok)
    assert "model.dtype='int8' is invalid" in refused(hf_dir, ("model.dtype=int8",))
    cfg = compose_train(["+experiment=hf_q4_0"], tmp_path / "r")
    with pytest.raises(Exception, match=r"model\.path|Missing mandatory value"):
        validate_config(cfg)
