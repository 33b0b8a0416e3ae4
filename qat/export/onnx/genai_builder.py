"""onnxruntime-genai's own model builder, run on a Hugging Face folder: the peer qat's genai
folders are measured against, and the graph :mod:`qat.export.onnx.genai` starts from."""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["BUILDER_PRECISIONS", "builder_folder", "builder_module"]

BUILDER_PRECISIONS = ("fp32", "int8", "int4")
_INSTALL = "pip install -e '.[genai]' (onnxruntime-genai and onnx-ir, with --no-deps)"


def builder_module() -> Any:
    """onnxruntime-genai's model builder module (it imports its siblings as top-level
    modules, so its folder goes on ``sys.path``)."""
    try:
        import onnxruntime_genai
    except ImportError:
        raise ValueError(f"export target genai needs onnxruntime-genai: {_INSTALL}") from None
    models = str(Path(onnxruntime_genai.__file__).parent / "models")
    if models not in sys.path:
        sys.path.append(models)
    try:
        from onnxruntime_genai.models import builder
    except ImportError as err:
        raise ValueError(
            f"onnxruntime-genai's model builder does not import ({err}): {_INSTALL}"
        ) from None
    return builder


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The builder prints its options and a progress bar per tensor: keep the run's log clean
    (the output is shown if it fails)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield
    except Exception as err:
        raise RuntimeError(
            f"{err}\n--- model builder output ---\n{out.getvalue()[-4000:]}"
        ) from err


def builder_folder(
    hf_dir: str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    extra_options: Mapping[str, Any] | None = None,
) -> Path:
    """Run onnxruntime-genai's model builder (CPU) on the Hugging Face folder ``hf_dir``.

    Args:
        hf_dir: a ``save_pretrained`` folder with its tokenizer.
        out_dir: the genai folder to write.
        precision: ``fp32``, ``int8`` or ``int4`` (the builder's RTN quantization of the float
            weights: ``MatMulNBits`` with blocks of 32 at ``accuracy_level`` 4 by default).
        extra_options: the builder's ``--extra_options`` (e.g. ``{"int4_accuracy_level": 0}``).
    """
    if precision not in BUILDER_PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid: one of {BUILDER_PRECISIONS}")
    builder = builder_module()
    out_dir = Path(out_dir)
    extra = [f"{k}={v}" for k, v in (extra_options or {}).items()]
    with tempfile.TemporaryDirectory() as cache, _quiet():
        opts = builder.parse_extra_options(
            None, str(hf_dir), str(out_dir), precision, "cpu", cache, extra
        )
        builder.create_model(None, str(hf_dir), str(out_dir), precision, "cpu", cache, **opts)
    return out_dir
