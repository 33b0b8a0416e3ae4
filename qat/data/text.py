"""Language-modelling data: the Python standard library as bytes, or your own text files.

:class:`TextDataModule` reads documents, assigns them whole to the test, validation and training
splits (so no split sees another's documents), turns each split into one stream of token ids
and cuts it into windows of ``seq_len + 1``: inputs ``x = w[:-1]``, next-token targets
``y = w[1:]``.

What it reads:

- by default, the ``.py`` sources of the running interpreter's standard library (every Python
  installation ships them: no download), one document per file;
- ``data_dir=<folder>`` (files matching ``pattern``) or ``files=[...]``: ``.jsonl`` files (one
  document per record, its ``text_field``), a ``datasets`` folder written by ``save_to_disk``
  (when the ``datasets`` package is installed), or any other text file. Your files are cut at
  line ends into documents of at most ``min(val_bytes, test_bytes)`` bytes, so that even a
  single file fills all three splits.

Tokens: the 256 byte values (no tokenizer: qat's ``gpt``), or a Hugging Face tokenizer
(``tokenizer=<a model folder>``, the ``model=hf`` folder): each document's ids, then the end of
sequence token, packed into one stream.

The stdlib differs between Python versions, so results are comparable on one interpreter
version (the results pages name it).
"""

from __future__ import annotations

import json
import os
import random
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

__all__ = ["TextDataModule", "TokenWindows", "read_documents", "stdlib_dir"]

#: Folders of the stdlib left out: third-party packages and the test suites (large, repetitive).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
#: Files that mark a folder written by ``datasets``' ``save_to_disk``.
_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
#: Bytes of a file inspected for NUL bytes (binary files).
_SNIFF = 8192


def stdlib_dir() -> Path:
    """The running interpreter's standard-library source folder."""
    return Path(sysconfig.get_paths()["stdlib"])


class TokenWindows(Dataset):
    """Non-overlapping windows of a token stream: ``(x, y)`` long tensors of ``seq_len``."""

    def __init__(self, data: torch.Tensor, seq_len: int) -> None:
        if len(data) < seq_len + 1:
            raise ValueError(
                f"a split of {len(data)} tokens is shorter than one window of seq_len+1="
                f"{seq_len + 1}: use more data (max_bytes) or a smaller seq_len"
            )
        self.data, self.seq_len = data, seq_len

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.seq_len
        window = self.data[start : start + self.seq_len + 1].long()
        return window[:-1], window[1:]


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_text(path: Path) -> None:
    """Refuse a binary file (a NUL byte in its first 8 KiB)."""
    with path.open("rb") as f:
        head = f.read(_SNIFF)
    if b"\0" in head:
        raise ValueError(
            f"{path} is not a text file (it holds NUL bytes): remove it from the folder or "
            "narrow data.pattern"
        )


def _split_lines(text: bytes, limit: int | None) -> Iterator[bytes]:
    """``text`` in pieces of at most ``limit`` bytes, cut after a newline where one is."""
    if limit is None or len(text) <= limit:
        yield text
        return
    start = 0
    while start < len(text):
        end = min(start + limit, len(text))
        if end < len(text):
            cut = text.rfind(b"\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def _jsonl_records(path: Path, field: str) -> Iterator[bytes]:
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not a JSON line ({err.msg})") from None
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise ValueError(
                    f"{path}:{number} has no string field {field!r} (fields: "
                    f"{', '.join(record) if isinstance(record, dict) else type(record).__name__}"
                    "): set data.text_field=<the field holding the text>"
                )
            yield value.encode("utf-8")


def _datasets_records(folder: Path, field: str) -> Iterator[bytes]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{folder} is a `datasets` folder (save_to_disk) and the `datasets` package is not "
            "installed: pip install datasets, or export the text as .jsonl"
        ) from None
    data = datasets.load_from_disk(str(folder))
    splits = list(data.values()) if isinstance(data, datasets.DatasetDict) else [data]
    for split in splits:
        if field not in split.column_names:
            raise ValueError(
                f"{folder} has no column {field!r} (columns: {', '.join(split.column_names)}): "
                "set data.text_field=<the column holding the text>"
            )
        for value in split[field]:
            yield str(value).encode("utf-8")


def read_documents(
    paths: Sequence[Path], text_field: str = "text", chunk: int | None = None
) -> Iterator[bytes]:
    """The documents of ``paths`` in order, as UTF-8 bytes.

    A ``.jsonl`` file yields one document per record (its ``text_field``), a ``datasets`` folder
    one per row, any other file its text, cut at line ends into pieces of at most ``chunk``
    bytes (None: whole).

    Raises:
        ValueError: a binary file, a JSON line without the field.
    """
    for path in paths:
        if path.is_dir():
            yield from _datasets_records(path, text_field)
            continue
        _check_text(path)
        if path.suffix == ".jsonl":
            yield from _jsonl_records(path, text_field)
        else:
            yield from _split_lines(path.read_bytes(), chunk)


class TextDataModule(LightningDataModule):
    """Next-token prediction on text: bytes of the stdlib's sources, or your files' tokens.

    Attributes:
        vocab_size: 256 (bytes) or the tokenizer's size (after ``check()`` / ``setup()``).
        seq_len: tokens per training / evaluation window (the model's context).

    Args:
        data_dir: folder of your files (null: the stdlib, unless ``files`` is given), or a
            ``datasets`` folder written by ``save_to_disk``.
        files: your files (``.txt``, ``.jsonl``, ...) instead of a folder.
        pattern: glob the files' paths (relative to ``data_dir``) must match (null: ``*.py``
            in the stdlib, every file in ``data_dir``).
        text_field: the field of a ``.jsonl`` record (or ``datasets`` column) holding the text.
        tokenizer: a folder ``transformers.AutoTokenizer`` loads (the model's; null: bytes).
        seq_len: window length.
        batch_size: windows per batch.
        num_workers: DataLoader workers.
        max_bytes: bytes of text read in all (documents in the seeded order until this much).
        val_bytes: bytes of whole documents held out for validation.
        test_bytes: bytes of whole documents held out for the test.
        seed: seed of the file order.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        files: Sequence[str] | None = None,
        pattern: str | None = None,
        text_field: str = "text",
        tokenizer: str | None = None,
        seq_len: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        max_bytes: int = 4_000_000,
        val_bytes: int = 200_000,
        test_bytes: int = 200_000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_int("seq_len", seq_len, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("val_bytes", val_bytes, seq_len + 1)
        _check_int("test_bytes", test_bytes, seq_len + 1)
        _check_int("max_bytes", max_bytes, val_bytes + test_bytes + seq_len + 1)
        if data_dir and files:
            raise ValueError(
                "data_dir and files are both set: give one (a folder, or a list of files)"
            )
        if files is not None and (isinstance(files, str) or not all(files)):
            raise ValueError(f"files must be a list of paths, got {files!r}")
        self.data_dir = Path(data_dir) if data_dir else None
        self.file_list = [Path(f) for f in files] if files else None
        self.pattern = pattern
        self.text_field, self.tokenizer_path = text_field, tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.num_workers, self.seed = num_workers, seed
        self.max_bytes, self.val_bytes, self.test_bytes = max_bytes, val_bytes, test_bytes
        self.vocab_size = 256
        self._tokenizer: Any = None
        self._splits: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.train_set: TokenWindows | None = None
        self.val_set: TokenWindows | None = None
        self.test_set: TokenWindows | None = None

    @property
    def stdlib(self) -> bool:
        """True when reading the default corpus (the interpreter's stdlib)."""
        return self.data_dir is None and self.file_list is None

    @property
    def root(self) -> Path:
        return self.data_dir or stdlib_dir()

    def files(self) -> list[Path]:
        """The files read, in the seeded order (a ``datasets`` folder: the folder itself)."""
        if self.file_list is not None:
            files = list(self.file_list)
        elif self.data_dir is not None and self._is_datasets_folder():
            return [self.data_dir]
        else:
            root, files = self.root, []
            pattern = self.pattern or ("*.py" if self.stdlib else "*")
            for folder, dirs, names in os.walk(root):
                # Pruned while walking: the stdlib folder holds site-packages (torch and all).
                dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
                rel = Path(folder).relative_to(root)
                files += [
                    root / rel / n
                    for n in names
                    if not n.startswith(".") and (rel / n).match(pattern)
                ]
            files.sort()
        random.Random(self.seed).shuffle(files)
        return files

    def _is_datasets_folder(self) -> bool:
        return any((self.root / m).is_file() for m in _DATASETS_MARKERS)

    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer of ``tokenizer`` (None for bytes), loaded once."""
        if self.tokenizer_path is None or self._tokenizer is not None:
            return self._tokenizer
        from qat.hf_folder import load_hf_tokenizer

        self._tokenizer = load_hf_tokenizer(self.tokenizer_path)
        self.vocab_size = len(self._tokenizer)
        return self._tokenizer

    def check(self) -> None:
        """Find, read and tokenize the text, before any training.

        Raises:
            FileNotFoundError: no folder, no matching file, a listed file that is missing.
            ValueError: a binary file, a bad JSON line, too little text for the three splits.
        """
        if self.file_list is not None:
            missing = [str(p) for p in self.file_list if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"data.files: no such file: {', '.join(missing)}")
        elif not self.root.is_dir() or not self.files():
            if self.stdlib:
                where = f"the stdlib of {sys.executable}"
            elif not self.root.is_dir():
                where = "data_dir: no such folder"
            else:
                where = "data_dir is empty" if not any(self.root.iterdir()) else "data_dir"
            raise FileNotFoundError(
                f"no files matching {self.pattern or '*'!r} in {self.root} ({where}); set "
                "data.data_dir=<a folder of text files> (and data.pattern=...) or "
                "data.files=[...]"
            )
        self.tokenizer()
        self._load()

    def documents(self) -> list[list[bytes]]:
        """The documents of the test, validation and training splits, in that order (UTF-8;
        e.g. to train a tokenizer on the training split only)."""
        splits: list[list[bytes]] = [[], [], []]  # test, val, train
        sizes = [0, 0, 0]
        limits = (self.test_bytes, self.val_bytes, self.max_bytes - self.val_bytes)
        # The stdlib keeps whole files (the published figures); your files are cut so that one
        # file alone fills all three splits.
        chunk = None if self.stdlib else min(self.val_bytes, self.test_bytes)
        i = 0
        for doc in read_documents(self.files(), self.text_field, chunk):
            while i < 2 and sizes[i] >= limits[i]:
                i += 1
            if sum(sizes) >= self.max_bytes:
                break
            splits[i].append(doc)
            sizes[i] += len(doc) + 1
        return splits

    def _tokens(self, docs: list[bytes], limit: int | None) -> torch.Tensor:
        """One split's token stream: bytes (each document then a newline, cut at ``limit``),
        or each document's token ids then the end-of-sequence token."""
        tok = self.tokenizer()
        if tok is None:
            text = b"".join(d + b"\n" for d in docs)[:limit]
            if not text:  # frombuffer refuses an empty buffer
                return torch.zeros(0, dtype=torch.uint8)
            return torch.frombuffer(bytearray(text), dtype=torch.uint8)
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        texts = [d.decode("utf-8", errors="replace") for d in docs]
        ids: list[int] = []
        for piece in tok(texts, add_special_tokens=False)["input_ids"] if texts else []:
            ids += piece + eos
        return torch.tensor(ids, dtype=torch.int32)

    def _load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The train, validation and test token streams (read once)."""
        if self._splits is None:
            test_docs, val_docs, train_docs = self.documents()
            train = self._tokens(train_docs, self.max_bytes - self.val_bytes)
            val, test = self._tokens(val_docs, None), self._tokens(test_docs, None)
            for name, data in (("train", train), ("validation", val), ("test", test)):
                if len(data) < self.seq_len + 1:
                    raise ValueError(
                        f"too little text for the {name} split: {len(data)} tokens, less than "
                        f"one window of seq_len+1={self.seq_len + 1} (the test and validation "
                        f"splits take test_bytes={self.test_bytes} and val_bytes="
                        f"{self.val_bytes} of text first): add text, or lower data.val_bytes / "
                        "data.test_bytes / data.seq_len"
                    )
            self._splits = (train, val, test)
        return self._splits

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.check()
        train, val, test = self._load()
        self.train_set = TokenWindows(train, self.seq_len)
        self.val_set = TokenWindows(val, self.seq_len)
        self.test_set = TokenWindows(test, self.seq_len)

    def _loader(self, data: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)
