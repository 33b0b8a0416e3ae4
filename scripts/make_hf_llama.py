"""Build a Llama-style Hugging Face model of realistic shape on this machine's text, no download.

A byte-level BPE tokenizer is trained with ``tokenizers`` on the training split of the
``data=text`` corpus (the Python standard library's sources: the same split qat's runs use, so
the tokenizer never saw the validation or test files), a ``LlamaForCausalLM`` is pre-trained on
that split for ``--steps`` steps, and both are saved with ``save_pretrained``: the folder is a
``model=hf model.path=`` for every ``+experiment=hf_*``.

Sizes (``--size``): ``33m`` (d 512, 8 blocks, 8 heads / 4 KV heads, MLP 1536, vocab 8192:
33.6M parameters; every row a multiple of 256, so GGUF's k-quant super-blocks fit) and ``tiny``
(d 64, 2 blocks, vocab 512: the smoke test's).

    python scripts/make_hf_llama.py --out outputs/models/stdlib-llama-33m --steps 200 \
        --seq-len 128 --batch-size 4 --lr 2e-3  # docs/lm_results.md's model (~30 min, 1 thread)
    python train.py +experiment=hf_q4_0 model.path=outputs/models/stdlib-llama-33m

``pretraining.json`` in the folder records the run (steps, tokens seen, test perplexity).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python scripts/make_hf_llama.py` from a checkout

#: Model shapes by name: LlamaConfig arguments and the tokenizer's vocabulary.
SIZES: dict[str, dict[str, int]] = {
    "33m": {
        "vocab_size": 8192,
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 1536,
    },
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 256,
    },
}
BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` (GPT-2 style pre-tokenizer) on ``texts``."""
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
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS
    )


def _batches(data: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator) -> Any:
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + seq_len + 1].long() for s in starts.tolist()])
        yield x[:, :-1], x[:, 1:]


@torch.no_grad()
def perplexity(model: torch.nn.Module, loader: Any, batches: int) -> float:
    model.eval()
    nll, n = 0.0, 0
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        logits = model(input_ids=x, use_cache=False).logits.float()
        nll += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        n += y.numel()
    model.train()
    return math.exp(nll / max(n, 1))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--size", choices=sorted(SIZES), default="33m")
    parser.add_argument("--steps", type=int, default=3000, help="pre-training steps (0: none)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-bytes", type=int, default=4_000_000, help="data=text's max_bytes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 0 or args.seq_len < 8 or args.batch_size < 1:
        parser.error("--steps >= 0, --seq-len >= 8 and --batch-size >= 1, please")

    import qat  # noqa: F401  # first: lets transformers import beside a CUDA-built torchvision
    from qat.data import TextDataModule

    from transformers import LlamaConfig, LlamaForCausalLM  # isort: skip

    out = Path(args.out)
    torch.manual_seed(args.seed)
    shape = SIZES[args.size]
    text = TextDataModule(max_bytes=args.max_bytes, seq_len=args.seq_len, seed=args.seed)
    text.check()
    _, _, train_docs = text.documents()
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(
        [d.decode("utf-8", "replace") for d in train_docs], shape["vocab_size"]
    )
    tokenizer.save_pretrained(out)
    print(f"tokenizer: {len(tokenizer)} tokens, {time.perf_counter() - t0:.0f} s", flush=True)

    config = LlamaConfig(
        **shape,
        max_position_embeddings=max(args.seq_len, 512),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.1f}M parameters", flush=True)

    # The same files and splits as a run's data=text, through the new tokenizer.
    data = TextDataModule(
        tokenizer=str(out),
        max_bytes=args.max_bytes,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    data.setup()
    print(f"data: {len(data.train_set.data)} training tokens", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    train = _batches(data.train_set.data, args.seq_len, args.batch_size, gen)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(s, args.steps) / max(args.steps, 1)))
        ),
    )
    model.train()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = next(train)
        loss = F.cross_entropy(
            model(input_ids=x, use_cache=False).logits.float().flatten(0, 1), y.flatten()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step in (1, args.steps) or step % 100 == 0:
            rate = step / (time.perf_counter() - t0)
            print(
                f"step {step}/{args.steps} loss {loss.item():.3f} ({rate:.2f} steps/s)", flush=True
            )
    train_s = time.perf_counter() - t0
    val = perplexity(model, iter(data.val_dataloader()), batches=8)
    test = perplexity(model, iter(data.test_dataloader()), batches=16)
    print(f"val perplexity {val:.3f} (8 batches of {args.batch_size} x {args.seq_len})")
    print(f"test perplexity {test:.3f} (16 batches of {args.batch_size} x {args.seq_len})")
    model.save_pretrained(out)
    # What the folder's pre-training was (scripts/lm_table.py reports it on the page).
    summary = {
        "size": args.size,
        "parameters": params,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "train_tokens": len(data.train_set.data),
        "threads": torch.get_num_threads(),
        "train_s": round(train_s),
        "val_ppl_8_batches": val,
        "test_ppl_16_batches": test,
    }
    (out / "pretraining.json").write_text(json.dumps(summary, indent=2))
    print(f"saved {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
