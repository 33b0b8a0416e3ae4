"""A Hugging Face tokenizer embedded in a GGUF file, so llama.cpp tokenizes text as it does.

Two tokenizer models, told apart as ``convert_hf_to_gguf.py`` does:

- byte-level BPE (GPT-2, Qwen, Llama 3, a ``tokenizers`` BPE trained with the ``ByteLevel``
  pre-tokenizer): ``tokenizer.ggml.model = gpt2``, tokens by id, merges, and the pre-tokenizer
  name llama.cpp selects its split regex by (:func:`pre_tokenizer_name`);
- SentencePiece-style BPE with byte fallback (Llama 1–2, Mistral, Gemma, Phi-3 in their
  ``tokenizer.json`` form): ``tokenizer.ggml.model = llama`` with scores and token types, read
  by the ``gguf`` package's :class:`gguf.vocab.LlamaHfVocab`.

Special token ids, ``add_bos`` / ``add_eos`` and the chat template come from
:class:`gguf.SpecialVocab` (``tokenizer_config.json``). Ids the model has beyond the tokenizer's
(a padded embedding) get ``[PAD<i>]`` tokens of type UNUSED, as the converter writes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["pre_tokenizer_name", "tokenizer_folder", "write_tokenizer"]

# The split regexes of tokenizer.json as the model authors wrote them, and the name llama.cpp
# knows each by (llama-vocab.cpp quotes these originals beside its adapted expressions).
_SPLIT_REGEXES = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def tokenizer_folder(
    model: nn.Module, tokenizer: str | os.PathLike[str] | None = None
) -> Path | None:
    """The folder whose tokenizer goes into the file: ``tokenizer``, else the one the model
    was loaded from (``config._name_or_path``) if it holds a tokenizer, else None.

    Raises:
        ValueError: ``tokenizer`` was given but holds no ``tokenizer.json``.
    """
    if tokenizer is not None:
        folder = Path(tokenizer)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(
                f"tokenizer folder {str(folder)!r} has no tokenizer.json: give the Hugging Face "
                "folder the model was saved in (tokenizer.save_pretrained writes it)"
            )
        return folder
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    folder = Path(source)
    if source and folder.is_dir() and (folder / "tokenizer.json").is_file():
        return folder
    return None


def _split_regex(pre: dict[str, Any] | None) -> list[str]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [r for p in pre.get("pretokenizers", []) for r in _split_regex(p)]
    if pre.get("type") == "Split":
        pattern = pre.get("pattern", {})
        return [pattern.get("Regex") or pattern.get("String") or ""]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return ["gpt-2"]
    return []


def _prepends_space(normalizer: dict[str, Any] | None) -> bool:
    """True when the normalizer prepends ``▁`` (SentencePiece's ``add_dummy_prefix``)."""
    if not normalizer:
        return False
    if normalizer.get("type") == "Sequence":
        return any(_prepends_space(n) for n in normalizer.get("normalizers", []))
    return normalizer.get("type") == "Prepend"


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE ``tokenizer.json``.

    Raises:
        ValueError: a split regex llama.cpp is not known to implement (named).
    """
    regexes = _split_regex(tokenizer_json.get("pre_tokenizer"))
    if regexes == ["gpt-2"]:
        return "gpt-2"
    for regex in regexes:
        if regex in _SPLIT_REGEXES:
            return _SPLIT_REGEXES[regex]
    raise ValueError(
        f"the tokenizer's pre-tokenizer splits with {regexes or 'no regex'}, which qat cannot "
        "name for llama.cpp (it knows GPT-2's ByteLevel split, Llama 3's and Qwen 2's): "
        "export it with export.targets=[onnx] or pass a tokenizer of one of those kinds"
    )


def _bpe_tokens(tok: dict[str, Any]) -> tuple[list[str], list[int]]:
    import gguf

    vocab: dict[str, int] = tok["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    types = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        special = added.get("special", False)
        types[added["id"]] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    return tokens, [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(n)]


def _pad(tokens: list, types: list[int], scores: list[float] | None, n_vocab: int) -> None:
    import gguf

    if len(tokens) > n_vocab:
        raise ValueError(
            f"the tokenizer has {len(tokens)} tokens, the model's embedding {n_vocab} rows: "
            "resize the embedding (model.resize_token_embeddings) or use the model's own tokenizer"
        )
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
        if scores is not None:
            scores.append(-1000.0)


def write_tokenizer(writer: Any, folder: Path, n_vocab: int) -> str:
    """Write the tokenizer of the Hugging Face ``folder`` into ``writer`` (a ``GGUFWriter``).

    Returns:
        The ``tokenizer.ggml.model`` written (``gpt2`` or ``llama``).

    Raises:
        ValueError: a tokenizer llama.cpp cannot run (the reason named).
    """
    import gguf

    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(
            f"the tokenizer in {str(folder)!r} is a {model.get('type')} model; GGUF export embeds "
            "BPE tokenizers (byte-level, or SentencePiece-style with byte fallback)"
        )
    if model.get("byte_fallback", False):
        vocab = gguf.vocab.LlamaHfVocab(folder)
        tokens, scores, types = [], [], []
        for i, (text, _, toktype) in enumerate(vocab.all_tokens()):
            tokens.append(text)
            # llama.cpp's SentencePiece tokenizer merges the pair whose result scores highest;
            # a BPE's merges made its tokens in id order, so -id ranks them as its merges do
            # (LlamaHfVocab's placeholder scores are all equal).
            scores.append(-float(i) if toktype == gguf.TokenType.NORMAL else 0.0)
            types.append(int(toktype))
        _pad(tokens, types, scores, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(_prepends_space(tok.get("normalizer")))
        load_merges, kind = False, "llama"
    else:
        tokens, types = _bpe_tokens(tok)
        _pad(tokens, types, None, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(tok))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        load_merges, kind = True, "gpt2"
    special = gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    return kind
