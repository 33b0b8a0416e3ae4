"""The quickstart notebook runs top to bottom and reaches the numbers it claims."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = "\n".join(
        out.get("text", "") or str(out.get("data", {}).get("text/plain", ""))
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert "bit width per epoch: [8, 6, 4, 4, 4]" in outputs
    # The last cell prints the accuracy dict as one JSON line: QAT beats PTQ, and the exported
    # models agree with the fake-quant model.
    last = [out for out in nb.cells[-1].get("outputs", []) if out.get("name") == "stdout"]
    assert last, "the notebook's last cell printed nothing"
    results = json.loads(last[-1]["text"].strip().splitlines()[-1])
    assert results["QAT W4A4"] >= results["PTQ W4A4"]
    for key in ("torchscript INT", "onnx INT"):
        assert abs(results[key] - results["QAT W4A4"]) <= 0.1, results
