"""Demo member ``demo-transformer``: a small GPT trained briefly on public-domain text.

The tokenizer is a byte-level BPE trained offline with ``tokenizers`` on the same text
(``data/corpus.txt``), and training runs through the type's own batch handler.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from vla_foundry.checkpoint import save_experiment
from vla_foundry.demo.training import train
from vla_foundry.models.registry import create_batch_handler, create_model
from vla_foundry.params.transformer import TransformerParams

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
EOS = "<|endoftext|>"
VOCAB_SIZE = 1024
SEQ_LEN = 128
STEPS = 300
BATCH = 16
SEED = 0


# A work starts at its title line: "<title>, by <author> (<year>)" or "<title>, traditional nursery rhyme".
TITLE = re.compile(r"^(.+\(.*\d{4}.*\)|.+, traditional nursery rhyme)$", re.MULTILINE)


def corpus_documents() -> list[str]:
    """The corpus split into works (each starting with its title line)."""
    text = "\n".join(line for line in CORPUS.read_text(encoding="utf-8").splitlines() if not line.startswith("#"))
    starts = [m.start() for m in TITLE.finditer(text)] + [len(text)]
    return [text[a:b].strip() for a, b in zip(starts, starts[1:]) if text[a:b].strip()]


def train_tokenizer(documents: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def build(experiment_dir: Path, progress: bool = True, steps: int = STEPS) -> None:
    documents = corpus_documents()
    tokenizer = train_tokenizer(documents)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in documents:
        ids += tokenizer.encode(doc, add_special_tokens=False) + [eos]
    data = torch.tensor(ids, dtype=torch.long)

    params = TransformerParams(hidden_dim=128, n_layers=4, n_heads=4, vocab_size=len(tokenizer),
                               max_seq_len=256, ffn_type="swiglu", norm_type="default_layer_norm")
    generator = torch.Generator().manual_seed(SEED)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = create_model(params, load_pretrained=False)
    handler = create_batch_handler("transformer")

    def batch() -> dict:
        starts = torch.randint(0, len(data) - SEQ_LEN - 1, (BATCH,), generator=generator)
        return {"input_ids": torch.stack([data[s:s + SEQ_LEN + 1] for s in starts.tolist()])}  # (B, SEQ_LEN + 1)

    loss_value = train(model, handler, batch, steps=steps, lr=3e-3, betas=(0.9, 0.95), warmup=30,
                       desc="demo-transformer", progress=progress, generator=generator)
    save_experiment(model, experiment_dir, checkpoint_num=1, global_step=steps, tokenizer=tokenizer,
                    training_config={"name": "demo-transformer", "data": {"seq_len": SEQ_LEN}})
    (experiment_dir / "demo.json").write_text(json.dumps({
        "description": "A 4-layer, width-128 GPT trained on CPU for a few hundred steps on public-domain text "
                       "(Shakespeare's sonnets, Aesop, the Gettysburg Address, ...). Expect pastiche, not sense.",
        "random_weights": False, "train_steps": steps, "final_train_loss": round(loss_value, 4),
    }, indent=2))
