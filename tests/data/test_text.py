"""``data=text`` on your own files: .txt / .jsonl, bytes or a Hugging Face tokenizer; bad input
is refused in one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_folder import stdlib_sample
from lit_helpers import compose_train

from qat.data import TextDataModule
from qat.lit.config import ConfigError, validate_config

pytest.importorskip("transformers")

SMALL = {"seq_len": 32, "max_bytes": 60_000, "val_bytes": 6_000, "test_bytes": 6_000}


def _text() -> str:
    """About 70 KB of Python source (a few stdlib files)."""
    return "".join(p.read_text() for p in stdlib_sample())[:70_000]


def test_one_txt_file_fills_three_disjoint_splits_as_bytes(tmp_path: Path) -> None:
    (tmp_path / "book.txt").write_text(_text())
    dm = TextDataModule(data_dir=str(tmp_path), **SMALL)
    dm.setup()
    assert dm.vocab_size == 256
    sizes = [len(s.data) for s in (dm.train_set, dm.val_set, dm.test_set)]
    # The file is cut at line ends into documents of at most 6000 bytes, assigned whole.
    assert 6_000 <= sizes[2] < 12_000 and 6_000 <= sizes[1] < 12_000
    # Documents are read until max_bytes (all splits together) is reached.
    assert SMALL["max_bytes"] <= sum(sizes) < SMALL["max_bytes"] + 6_002
    x, y = dm.train_set[0]
    assert x.shape == (32,) and torch.equal(x[1:], y[:-1])
    # One file: its documents stay in order, test first, then validation, then training.
    source = _text().encode()
    heads = [bytes(s.data[:200].tolist()) for s in (dm.test_set, dm.val_set, dm.train_set)]
    assert source.find(heads[0]) == 0
    assert 6_000 <= source.find(heads[1]) < source.find(heads[2])


def test_jsonl_records_through_the_model_tokenizer(tmp_path: Path, hf_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    lines = [line for line in _text().splitlines() if line.strip()]
    records = [{"body": "\n".join(lines[i : i + 20]), "id": i} for i in range(0, len(lines), 20)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    dm = TextDataModule(files=[str(path)], text_field="body", tokenizer=str(hf_dir), **SMALL)
    dm.setup()
    assert dm.vocab_size == len(tok) == 512
    test = dm.test_set.data.tolist()
    # The first test document is the first record in order, its ids then </s>.
    first = tok(records[0]["body"], add_special_tokens=False)["input_ids"]
    assert test[: len(first) + 1] == [*first, tok.eos_token_id]
    assert max(dm.train_set.data.tolist()) < 512


def test_a_datasets_folder_saved_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    lines = _text().splitlines(keepends=True)
    docs = ["".join(lines[i : i + 40]) for i in range(0, len(lines), 40)]
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": docs, "n": list(range(len(docs)))}).save_to_disk(folder)
    dm = TextDataModule(data_dir=str(folder), text_field="body", **SMALL)
    assert dm.files() == [folder]
    dm.setup()
    # Rows are documents, in order: the test split starts with the first row.
    assert bytes(dm.test_set.data[:300].tolist()) == docs[0].encode()[:300]
    assert len(dm.train_set) > 0 and len(dm.val_set) > 0
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: body, n\)"):
        TextDataModule(data_dir=str(folder), **SMALL).check()


def _refused(tmp_path: Path, overrides: list[str]) -> str:
    cfg = compose_train(["+experiment=gpt_float", *overrides], tmp_path / "run")
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_text_input_is_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "data_dir is empty" in _refused(tmp_path, [f"data.data_dir={empty}"])
    missing = tmp_path / "nowhere"
    assert "no such folder" in _refused(tmp_path, [f"data.data_dir={missing}"])
    assert "no such file" in _refused(tmp_path, [f"data.files=[{missing}/a.txt]"])
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "a.txt").write_text(_text())
    (binary / "model.bin").write_bytes(b"\x00\x01\x02" * 100)
    assert "model.bin is not a text file" in _refused(tmp_path, [f"data.data_dir={binary}"])
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("print('hello')\n" * 100)
    message = _refused(tmp_path, [f"data.data_dir={small}"])
    assert "too little text for the" in message and "data.val_bytes" in message
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    message = _refused(tmp_path, [f"data.files=[{bad}]"])
    assert "no string field 'text'" in message and "data.text_field" in message
