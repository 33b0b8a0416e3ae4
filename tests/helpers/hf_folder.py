"""A tiny Hugging Face causal-LM folder, built here (no download): the tests' ``model.path``.

:func:`make_hf_folder` writes what ``save_pretrained`` writes for a real checkpoint: a Llama
(or any ``transformers`` causal-LM config) with random weights, plus a byte-level BPE tokenizer
trained with ``tokenizers`` on a few of this interpreter's stdlib ``.py`` files and saved as a
``PreTrainedTokenizerFast`` (``tokenizer.json``, ``tokenizer_config.json``). The folder loads
with ``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)`` and
``AutoTokenizer.from_pretrained(path)``.

Example:
    >>> path = make_hf_folder(tmp_path / "tiny-llama")
    >>> path = make_hf_folder(tmp_path / "qwen", family="qwen2")
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import torch

__all__ = ["FAMILIES", "make_hf_config", "make_hf_folder", "stdlib_sample", "train_bpe"]

#: Stdlib modules the tokenizer trains on (present on every CPython 3.10+).
_SOURCES = ("textwrap.py", "string.py", "fnmatch.py", "shlex.py", "glob.py", "heapq.py")
#: Special tokens of the tokenizer (Llama's spelling).
BOS, EOS, UNK = "<s>", "</s>", "<unk>"

#: Small configs per model family (keyword arguments of its ``transformers`` config class).
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "LlamaConfig",
        {"intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},
    ),
    "mistral": (
        "MistralConfig",
        {"intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},
    ),
    "qwen2": (
        "Qwen2Config",
        {"intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},
    ),
    "qwen3": (
        "Qwen3Config",
        {
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
        },
    ),
    "gemma": (
        "GemmaConfig",
        {
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 16,
        },
    ),
    "phi3": (
        "Phi3Config",
        {"intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4},
    ),
    "gpt2": ("GPT2Config", {"n_head": 4}),
}


def stdlib_sample(max_files: int = len(_SOURCES)) -> list[Path]:
    """A few stdlib source files (the tokenizer's training text and the tests' data)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [root / name for name in _SOURCES[:max_files] if (root / name).is_file()]


def train_bpe(vocab_size: int = 512, files: list[Path] | None = None) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``files`` (stdlib by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(p) for p in files or stdlib_sample()], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS
    )


def make_hf_config(
    family: str = "llama",
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    context: int = 128,
) -> Any:
    """The ``transformers`` config of a tiny ``family`` model (see :data:`FAMILIES`)."""
    import transformers

    cls_name, extra = FAMILIES[family]
    cls = getattr(transformers, cls_name)
    if family == "gpt2":
        return cls(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_positions=context,
            bos_token_id=1,
            eos_token_id=2,
            **extra,
        )
    return cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        max_position_embeddings=context,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
        **extra,
    )


def make_hf_folder(
    path: str | Path,
    family: str = "llama",
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    context: int = 128,
    seed: int = 0,
    tokenizer: bool = True,
) -> Path:
    """``save_pretrained`` of a tiny random ``family`` causal LM (and its tokenizer) in ``path``.

    Args:
        path: the folder (created).
        family: a key of :data:`FAMILIES`.
        vocab_size: the tokenizer's (and the model's) vocabulary.
        hidden: hidden size (a multiple of 32: every weight row on GGUF's blocks of 32).
        layers: transformer blocks.
        context: ``max_position_embeddings``.
        seed: the weights' seed.
        tokenizer: also train and save the BPE tokenizer (False: a folder without one).
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = make_hf_config(family, vocab_size, hidden, layers, context)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    if tokenizer:
        train_bpe(vocab_size).save_pretrained(path)
    return path
