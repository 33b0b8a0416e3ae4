"""GGUF export of every Hugging Face family llama.cpp runs, from a saved folder with a tokenizer.

Per family a tiny random model (2 layers) is saved with its BPE tokenizer, loaded back, prepared
with ``quant=lm_q4_0``, trained a few steps and exported. Without llama.cpp: ``gguf.GGUFReader``
reads back the architecture, the tensor names llama.cpp's map allows and their shapes, the
embedded tokenizer; the file's dequantized tensors equal the fake-quant weights exactly; and
:class:`~qat.export.gguf_runner.GGUFRunner` (llama.cpp's graphs in PyTorch) agrees with the
fake-quant model. ``test_gguf_llamacpp.py`` runs the same files in real llama.cpp (slow).
"""

from __future__ import annotations

import itertools
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qat
from qat.export.gguf import export_gguf
from qat.export.gguf_arch import gguf_layout
from qat.export.gguf_vocab import pre_tokenizer_name
from qat.export.lm_weights import quant_weight
from qat.export.verify_lm import check_lm_parity, verify_lm_artifacts

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from hf_folder import make_hf_config, make_hf_folder, stdlib_sample, train_bpe  # noqa: E402
from lm_helpers import lm_recipe  # noqa: E402

#: family → llama.cpp arch
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "phi3": "phi3",
    "gpt2": "gpt2",
}
SEQ = 64


def _gemma23_config(family: str):
    """Gemma 2 / 3 with a sliding window shorter than the test sequences (so it masks), and
    llama.cpp's attention scale (query_pre_attn_scalar = head_dim)."""
    cls = transformers.Gemma2Config if family == "gemma2" else transformers.Gemma3TextConfig
    return cls(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=128,
        sliding_window=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def save_family(path: Path, family: str, hidden: int = 64) -> Path:
    """A tiny ``family`` folder; Gemma ties its output layer to the embedding, as llama.cpp's
    gemma graph reads it. ``hidden=256``: a Llama whose every input size fits k-quant blocks."""
    if hidden != 64:
        cfg = make_hf_config(family, hidden=hidden)
        cfg.intermediate_size = 2 * hidden
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
        train_bpe(cfg.vocab_size).save_pretrained(path)
        return path
    if not family.startswith("gemma"):
        return make_hf_folder(path, family=family)
    cfg = make_hf_config("gemma") if family == "gemma" else _gemma23_config(family)
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    train_bpe(cfg.vocab_size).save_pretrained(path)
    return path


@cache
def token_batches(folder: str) -> torch.Tensor:
    """``(16, SEQ + 1)`` token ids of stdlib text, through the folder's tokenizer."""
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok(stdlib_sample(2)[1].read_text()[:30000])["input_ids"]
    return torch.tensor(ids[: 16 * (SEQ + 1)]).reshape(16, SEQ + 1)


def prepared_family(
    tmp: Path, family: str, recipe: str = "lm_q4_0", steps: int = 8, hidden: int = 64
):
    folder = save_family(tmp / family, family, hidden)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    ids = token_batches(str(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the module-swap fallback warning
        qmodel = qat.prepare(model, lm_recipe(recipe), example_inputs=ids[:2, :SEQ])
    opt = torch.optim.AdamW(qmodel.parameters(), lr=3e-3)
    qmodel.train()
    for i in range(steps):
        x = ids[(i % 2) * 8 : (i % 2) * 8 + 8]
        loss = F.cross_entropy(qmodel(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qmodel.eval(), folder, ids


def _allowed_names(arch: str, blocks: int) -> set[str]:
    member = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = set()
    for t in gguf.MODEL_TENSORS[member]:
        fmt = gguf.TENSOR_NAMES[t]
        for bid in range(blocks):
            names.add(fmt.format(bid=bid))
    return {f"{n}.{s}" for n in names for s in ("weight", "bias")}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_gguf_names_tokenizer_weights_and_runner(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, folder, ids = prepared_family(tmp_path, family)
    path = export_gguf(model, tmp_path / "model.gguf")  # the tokenizer: from the model's folder
    reader = gguf.GGUFReader(str(path))
    arch = FAMILIES[family]
    assert reader.fields["general.architecture"].contents() == arch
    blocks = model.config.num_hidden_layers if family != "gpt2" else model.config.n_layer
    assert reader.fields[f"{arch}.block_count"].contents() == blocks
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) <= _allowed_names(arch, blocks)
    assert "token_embd.weight" in tensors and "output_norm.weight" in tensors

    # The tokenizer: every token of the folder's tokenizer under its id, merges, specials.
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    file_tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(file_tokens) == model.config.vocab_size
    assert all(file_tokens[i] == t for t, i in tok.get_vocab().items())
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) > 0
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id

    # Quantized tensors: the file dequantizes to the fake-quant weights, bit for bit.
    layout = gguf_layout(model)
    quantized = 0
    for entry in layout.tensors:
        if entry.layer is None or entry.name not in tensors:
            continue
        t = tensors[entry.name]
        shape = [int(n) for n in reversed(t.shape.tolist())]
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        got = got.reshape(shape).float()
        if t.tensor_type.name in ("Q4_0", "Q8_0"):
            want = quant_weight(entry.layer, entry.name).weight
            want = want if entry.rows is None else want[entry.rows]
            assert torch.equal(got, want), entry.name
            quantized += 1
    assert quantized >= 4 * blocks  # every projection of every block (fused in phi3, gpt2)

    # llama.cpp's graph in PyTorch agrees with the fake-quant model.
    batches = [(ids[8:, :SEQ], ids[8:, 1 : SEQ + 1])]
    report = verify_lm_artifacts(model, {"gguf": path}, batches, llama_cpp=False)
    check_lm_parity(report, min_agreement=0.999, max_ppl_rel_diff=0.001)


def test_gemma_embedding_quantized_and_scaled(tmp_path: Path) -> None:
    """Gemma's scaled embedding (an ``nn.Embedding`` subclass) is quantized and keeps its
    ``· √hidden``; the tied output layer is not written (llama.cpp reads token_embd)."""
    model, _, ids = prepared_family(tmp_path, "gemma", steps=2)
    emb = model.model.embed_tokens
    assert hasattr(emb, "weight_quant") and emb.weight_quant.enabled
    assert model.lm_head.weight is emb.weight  # prepare kept the tie
    x = ids[:2, :8]
    want = F.embedding(x, emb.weight_quant(emb.weight)) * emb.embed_scale
    assert torch.equal(emb(x), want)
    path = export_gguf(model, tmp_path / "gemma.gguf")
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert "output.weight" not in names
    norm = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}["output_norm.weight"]
    assert np.array_equal(np.array(norm.data), (model.model.norm.weight + 1).detach().numpy())


def test_gemma_untied_output_is_refused(tmp_path: Path) -> None:
    model, _, _ = prepared_family(tmp_path, "gemma", steps=1)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 2)
    with pytest.raises(ValueError, match="token_embd as the output layer"):
        export_gguf(model, tmp_path / "gemma.gguf")


def test_pre_tokenizer_names() -> None:
    byte_level = {"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    with pytest.raises(ValueError, match="cannot name for llama"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})


def test_unsupported_family_names_onnx(tmp_path: Path) -> None:
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(ValueError, match=r"export\.targets=\[onnx\]"):
        gguf_layout(transformers.BertForMaskedLM(cfg))


@pytest.mark.parametrize("recipe", ["lm_q4_k_m", "lm_q6_k"])
def test_kquant_export_decodes_to_the_fake_quant_model(recipe: str, tmp_path: Path) -> None:
    """Q4_K / Q6_K (the Q4_K_M mix): every quantized tensor in the file decodes to the
    fake-quant weight; llama.cpp's graph in PyTorch then computes the fake-quant logits."""
    cfg = make_hf_config("llama", hidden=256)
    cfg.intermediate_size = 512  # every input size a multiple of the 256-element super-block
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 33))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qat.prepare(model, lm_recipe(recipe), example_inputs=ids[:2, :32])
    model.train()
    model(ids[:, :32])  # observe: the k-quant scales follow the weights
    model.eval()
    path = export_gguf(model, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    if recipe == "lm_q4_k_m":
        assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.attn_v.weight"] == "Q6_K"
        assert types["blk.1.ffn_down.weight"] == "Q6_K" and types["output.weight"] == "Q6_K"
        assert reader.fields["general.file_type"].contents() == 15  # MOSTLY_Q4_K_M
    else:
        assert {t for n, t in types.items() if not n.endswith("norm.weight")} == {"Q6_K"}
    tensors = {t.name: t for t in reader.tensors}
    for entry in gguf_layout(model).tensors:
        if entry.layer is None:
            continue
        t = tensors[entry.name]
        got = np.array(gguf.quants.dequantize(t.data, t.tensor_type))
        want = entry.layer.weight_quant(entry.layer.weight).detach()
        want = want if entry.rows is None else want[entry.rows]
        assert np.array_equal(got.reshape(want.shape), want.numpy()), entry.name
    report = verify_lm_artifacts(
        model, {"gguf": path}, [(ids[:, :32], ids[:, 1:])], llama_cpp=False
    )
    check_lm_parity(report, min_agreement=0.999, max_ppl_rel_diff=0.001)


def test_gemma3_attention_scale_llama_cpp_cannot_compute_is_refused() -> None:
    cfg = _gemma23_config("gemma3")
    cfg.query_pre_attn_scalar = 256  # transformers' default; llama.cpp uses 1/sqrt(head_dim)
    with pytest.raises(ValueError, match="query_pre_attn_scalar=16"):
        gguf_layout(transformers.Gemma3ForCausalLM(cfg))


def save_spm_llama(path: Path, vocab_size: int = 600) -> Path:
    """A tiny Llama with a SentencePiece-style tokenizer: BPE with byte fallback, ``▁`` for
    spaces and a prepended ``▁``, ``<0x00>``-``<0xFF>`` byte tokens (Llama 2's tokenizer.json
    form)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False
    )
    tok.train([str(p) for p in stdlib_sample()], trainer)
    cfg = make_hf_config("llama", vocab_size=vocab_size)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    return path


def test_sentencepiece_style_tokenizer_is_written_as_llama_vocab(tmp_path: Path) -> None:
    folder = save_spm_llama(tmp_path / "spm")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    ids = torch.randint(0, 600, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qat.prepare(model, lm_recipe("lm_q8_0"), example_inputs=ids)
    model.train()
    model(ids)
    path = export_gguf(model.eval(), tmp_path / "model.gguf")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    vocab = transformers.AutoTokenizer.from_pretrained(folder).get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert types[vocab["<0x41>"]] == gguf.TokenType.BYTE
    assert types[vocab["<s>"]] == gguf.TokenType.CONTROL
    normal = [i for i, t in enumerate(types) if t == gguf.TokenType.NORMAL]
    assert all(scores[a] > scores[b] for a, b in itertools.pairwise(normal))  # merge order
