"""scripts/lm_table_hf.py (``lm_table.py --model hf``): bad input is one clear line, exit 2,
before any work; every trained row shares one training budget."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _script():
    sys.path.insert(0, str(SCRIPTS))  # it imports lm_table, lm_table_page beside it
    spec = importlib.util.spec_from_file_location("lm_table_hf", SCRIPTS / "lm_table_hf.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no config.json"),
        (["--groups", "q4_0,q5"], "unknown ['q5']"),
        (["--steps", "0"], "must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    if extra:
        (folder / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as err:
        _script().parse_args(["--path", str(folder), "--work", str(tmp_path / "w"), *extra])
    assert err.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # no work started


def test_every_trained_row_has_the_same_budget(tmp_path: Path) -> None:
    module = _script()
    (tmp_path / "config.json").write_text("{}")
    args = module.parse_args(["--path", str(tmp_path), "--steps", "7", "--batch-size", "3"])
    base = module.base_overrides(args)
    for preset in module.PRESETS.values():
        qat = module.qat_overrides(args, preset)
        assert qat[: len(base)] == base and f"quant={preset}" in qat
    assert "trainer.limit_train_batches=7" in base and "data.batch_size=3" in base
