"""The machine this process runs on, as the page names it."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path


@functools.cache  # one machine per process; collect asks for every new row, render again
def _machine() -> dict[str, str]:
    import onnxruntime
    import torch

    from qat.export.torchscript import ENGINE as TS_ENGINE

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
        platform.processor() or "?",
    )
    vnni = "yes" if ("avx512_vnni" in cpuinfo or "avx_vnni" in cpuinfo) else "no"
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores, VNNI: {vnni}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "TorchScript engine": f"{TS_ENGINE} (the export's, verified exact)",
    }
