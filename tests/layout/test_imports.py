"""The layout's rules, checked on the source: imports run one way (quant ← export ← lit).

- ``qat/quant`` (the core) imports torch and the standard library only: not ``qat.export``,
  ``qat.lit``, Lightning, Hydra / OmegaConf, ONNX or W&B;
- ``qat/export`` does not import the app (``qat.lit``, Lightning, Hydra, W&B);
- ``qat/models`` and ``qat/data`` know nothing of quantization or export;
- ``import qat`` loads neither Lightning nor ONNX;
- no file in ``qat/`` is over 450 lines (one concept per file).

Entry points (``train.py``, ``qat/export/__main__.py``) may import anything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "qat"
ENTRY_POINTS = {PKG / "export" / "__main__.py"}
MAX_LINES = 450

APP_LIBS = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb", "torchmetrics")
EXPORT_LIBS = ("onnx", "onnxruntime", "gguf")
FORBIDDEN = {
    "quant": ("qat.export", "qat.lit", "qat.data", "qat.models", *APP_LIBS, *EXPORT_LIBS),
    "export": ("qat.lit", "qat.data", "qat.models", *APP_LIBS),
    "models": ("qat.quant", "qat.export", "qat.lit", *APP_LIBS, *EXPORT_LIBS),
    "data": ("qat.quant", "qat.export", "qat.lit", "qat.models", *EXPORT_LIBS),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports (at any depth: lazy imports count too), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _violations(folder: str) -> list[str]:
    bad = []
    for path in sorted((PKG / folder).rglob("*.py")):
        if path in ENTRY_POINTS:
            continue
        for line, module in imported_modules(path):
            for banned in FORBIDDEN[folder]:
                if module == banned or module.startswith(banned + "."):
                    bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_run_one_way(folder: str) -> None:
    assert _violations(folder) == []


def test_the_rule_catches_an_import_of_export_from_the_core(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from qat.export.convert import convert\n")
    assert imported_modules(bad) == [(2, "qat.export.convert")]


def test_import_qat_loads_neither_lightning_nor_onnx() -> None:
    code = (
        "import sys, qat, qat.export; "
        "print(sorted(m for m in ('lightning', 'onnx', 'onnxruntime', 'hydra', 'omegaconf', "
        "'wandb') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_file_in_qat_is_over_the_line_limit() -> None:
    long = {
        str(p.relative_to(PKG.parent)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
