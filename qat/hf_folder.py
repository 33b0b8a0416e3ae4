"""A folder ``save_pretrained`` wrote: checked (one clear line for what is missing) and its
tokenizer loaded, offline. Shared by the model (``qat.models.hf``) and the data
(``qat.data.text``), which must not import each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["check_hf_folder", "load_hf_tokenizer", "transformers_module"]

#: Files of which one marks a saved tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def transformers_module() -> Any:
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "model=hf needs the `transformers` package: pip install -e '.[llm]'"
        ) from None
    return transformers


def check_hf_folder(
    path: str | Path | None, need_tokenizer: bool = True, need_config: bool = True
) -> Path:
    """``path`` as a ``Path`` if it holds a saved model (and tokenizer); one clear error if not.

    Raises:
        ValueError: no path, no folder, no ``config.json``, or no tokenizer files.
    """
    if path is None or str(path) in ("", "???"):
        raise ValueError("model.path is required: model.path=<a folder save_pretrained wrote>")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"model.path={path}: no such folder (a local folder save_pretrained wrote; "
            "nothing is downloaded)"
        )
    if need_config and not (folder / "config.json").is_file():
        raise ValueError(
            f"model.path={path} has no config.json: not a Hugging Face model folder (save one "
            "with model.save_pretrained(folder))"
        )
    if need_tokenizer and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(
            f"model.path={path} has no tokenizer ({', '.join(_TOKENIZER_FILES)}): save it there "
            "with tokenizer.save_pretrained(folder)"
        )
    return folder


def load_hf_tokenizer(path: str | Path) -> Any:
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)``, checked first."""
    folder = check_hf_folder(path, need_config=False)
    transformers = transformers_module()
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        raise ValueError(f"model.path={path}: the tokenizer does not load: {err}") from None
