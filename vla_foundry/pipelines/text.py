"""Text completion and language-model evaluation for any model of the ``text`` modality.

A text model provides ``forward(input_ids) -> .logits`` and the spec's ``generate``
(with ``generator`` and ``stopping`` keywords), ``vocab_size`` and ``max_seq_len``; this
pipeline adds what serving needs around it: tokenizing, batching prompts of different
lengths, stop strings, finish reasons, usage counts, seeds and input validation.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from vla_foundry.errors import InvalidInputError
from vla_foundry.models.registry import create_batch_handler
from vla_foundry.pipelines.base import Pipeline, register_pipeline
from vla_foundry.sampling import SamplingParams
from vla_foundry.tokenizer import load_tokenizer


@dataclass
class Completion:
    text: Optional[str]  # None when the deployment has no tokenizer
    token_ids: list[int]
    finish_reason: str  # "stop" (eos or a stop string) or "length"


@dataclass
class CompletionResult:
    completions: list[Completion]
    prompt_tokens: int
    completion_tokens: int
    seed: int
    prompt_token_ids: list[list[int]] = field(default_factory=list)


def pad_rows(rows: list[list[int]], value: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths → (B, T) tensor and its 0/1 mask.

    Prompts are left-padded so every row's next token is at the end: with the KV cache the
    padding keys are masked, and rotary attention depends only on relative positions, so a
    padded row decodes as it would alone. Training/evaluation batches are right-padded.
    """
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        out[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return out, mask


def new_seed() -> int:
    return secrets.randbits(63)


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@register_pipeline("text")
class TextPipeline(Pipeline):
    def __init__(self, model, tokenizer: Any = None, tokenizer_source: Optional[str] = None,
                 z_loss_coefficient: float = 0.0, cuda_graphs: bool = True):
        super().__init__(model)
        # Decode from captured CUDA graphs on GPUs, where the model supports it.
        self.cuda_graphs = cuda_graphs and getattr(model, "supports_cuda_graph", False)
        self.tokenizer = tokenizer
        self.tokenizer_source = tokenizer_source
        self.batch_handler = create_batch_handler(model.params.type, z_loss_coefficient=z_loss_coefficient)
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        self.eos_token_id: Optional[int] = eos
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_token_id: int = pad if pad is not None else (eos if eos is not None else 0)

    @classmethod
    def from_experiment(cls, model, experiment_dir: Path, *, tokenizer: Optional[str] = None,
                        training_config: Optional[dict] = None, cuda_graphs: bool = True,
                        **_: Any) -> "TextPipeline":
        tok, source = load_tokenizer(experiment_dir, tokenizer, training_config,
                                     model_default=getattr(model, "tokenizer_source", None))
        # Evaluate with the loss the run trained on (hparams.z_loss_coefficient).
        z_loss = float(((training_config or {}).get("hparams") or {}).get("z_loss_coefficient") or 0.0)
        return cls(model, tok, source, z_loss_coefficient=z_loss, cuda_graphs=cuda_graphs)

    # ------------------------------------------------------------------ discovery

    def io(self) -> dict[str, Any]:
        defaults = SamplingParams()
        return {
            "vocab_size": self.model.vocab_size,
            "max_seq_len": self.model.max_seq_len,
            "tokenizer": self.tokenizer_source,
            "accepts": ["prompt", "prompt_token_ids"] if self.tokenizer is not None else ["prompt_token_ids"],
            "eos_token_id": self.eos_token_id,
            "defaults": {"max_new_tokens": defaults.max_new_tokens, "temperature": defaults.temperature,
                         "top_k": defaults.top_k, "top_p": defaults.top_p},
        }

    def warmup(self) -> None:
        self.complete(prompt_token_ids=[[0]], sampling=SamplingParams(max_new_tokens=2, temperature=0.0), seed=0)

    # ------------------------------------------------------------------ inputs

    def encode_prompts(self, prompts: Optional[Sequence[str]], prompt_token_ids: Optional[Sequence[Sequence[int]]],
                       *, prompt_field: str = "prompt", ids_field: str = "prompt_token_ids") -> list[list[int]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise InvalidInputError(f"give exactly one of `{prompt_field}` or `{ids_field}`", field=prompt_field)
        if prompts is not None:
            if len(prompts) == 0:
                raise InvalidInputError(f"`{prompt_field}` is an empty list; send at least one prompt", field=prompt_field)
            if self.tokenizer is None:
                raise InvalidInputError(
                    f"this deployment has no tokenizer, so it takes token ids only: send `{ids_field}` "
                    f"(ints in [0, {self.model.vocab_size})) instead of `{prompt_field}`", field=prompt_field)
            for i, p in enumerate(prompts):
                try:
                    p.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise InvalidInputError(f"{prompt_field}[{i}] is not valid Unicode text ({e.reason} at "
                                            f"position {e.start})", field=prompt_field) from None
            ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
            field_name = prompt_field
        else:
            ids = [list(map(int, row)) for row in prompt_token_ids]
            field_name = ids_field
        if len(ids) == 0:
            raise InvalidInputError(f"`{field_name}` is empty; send at least one prompt", field=field_name)
        vocab = self.model.vocab_size
        for i, row in enumerate(ids):
            if len(row) == 0:
                raise InvalidInputError(f"{field_name}[{i}] is empty (no tokens); every prompt needs at least one",
                                        field=field_name)
            bad = [t for t in row if not 0 <= t < vocab]
            if bad:
                raise InvalidInputError(f"{field_name}[{i}] has token ids outside [0, {vocab}): {bad[:5]}",
                                        field=field_name)
        return ids

    # ------------------------------------------------------------------ predict

    @torch.inference_mode()
    def complete(self, prompts: Optional[Sequence[str]] = None, prompt_token_ids: Optional[Sequence[Sequence[int]]] = None,
                 *, sampling: SamplingParams = SamplingParams(), stop: Sequence[str] = (), seed: Optional[int] = None,
                 use_cache: bool = True) -> CompletionResult:
        ids = self.encode_prompts(prompts, prompt_token_ids)
        if sampling.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be >= 1; got {sampling.max_new_tokens}",
                                    field="max_new_tokens")
        longest = max(len(r) for r in ids)
        if longest + sampling.max_new_tokens > self.model.max_seq_len:
            raise InvalidInputError(
                f"prompt length ({longest}) + max_new_tokens ({sampling.max_new_tokens}) exceeds this model's "
                f"max_seq_len ({self.model.max_seq_len}); shorten the prompt or ask for fewer tokens",
                field="max_new_tokens")
        if stop and self.tokenizer is None:
            raise InvalidInputError("stop strings need a tokenizer; this deployment has none", field="stop")
        if any(not s for s in stop):
            raise InvalidInputError("stop strings must be non-empty", field="stop")
        seed = new_seed() if seed is None else seed
        generator = make_generator(self.device, seed)
        if use_cache or len({len(r) for r in ids}) == 1:
            rows = self._generate(ids, sampling, stop, use_cache, generator)
        else:
            # Without the cache a causal model ignores the padding mask (VLA Foundry's B3), so
            # prompts of different lengths are generated one at a time to stay correct.
            rows = [row for prompt in ids for row in self._generate([prompt], sampling, stop, False, generator)]
        completions = []
        for tokens, kept in rows:
            finished = kept is not None
            tokens = tokens[:kept] if finished else tokens
            if finished and self.eos_token_id is not None and tokens and tokens[-1] == self.eos_token_id:
                tokens = tokens[:-1]
            text = None
            if self.tokenizer is not None:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                for s in stop:
                    if s in text:
                        text = text[:text.index(s)]
            completions.append(Completion(text, tokens, "stop" if finished else "length"))
        return CompletionResult(completions, prompt_tokens=sum(len(r) for r in ids),
                                completion_tokens=sum(len(c.token_ids) for c in completions), seed=seed,
                                prompt_token_ids=ids)

    def _generate(self, ids: list[list[int]], sampling: SamplingParams, stop: Sequence[str], use_cache: bool,
                  generator: torch.Generator) -> list[tuple[list[int], Optional[int]]]:
        """Per row: the new tokens, and how many to keep when the row finished (eos or a stop string)."""
        input_ids, mask = (t.to(self.device) for t in pad_rows(ids, self.pad_token_id, left=True))
        stop_at: list[Optional[int]] = [None] * len(ids)

        def stopping(new_ids: torch.Tensor) -> torch.Tensor:
            n = new_ids.shape[1]
            last = new_ids[:, -1].tolist()  # one device sync per step, not one per row
            for row in range(len(ids)):
                if stop_at[row] is not None:
                    continue
                if last[row] == self.eos_token_id:
                    stop_at[row] = n
                elif stop and any(s in self.tokenizer.decode(new_ids[row].tolist()) for s in stop):
                    stop_at[row] = n
            return torch.tensor([s is not None for s in stop_at])

        generated = self.model.generate(
            input_ids, mask, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, top_k=sampling.top_k, eos_token_id=None, use_cache=use_cache,
            generator=generator, stopping=stopping if (self.eos_token_id is not None or stop) else None,
            **({"cuda_graph": True} if self.cuda_graphs and self.device.type == "cuda" else {}))
        return list(zip(generated[:, input_ids.shape[1]:].tolist(), stop_at))

    # ------------------------------------------------------------------ evaluate

    @torch.inference_mode()
    def evaluate(self, input_ids: Optional[Sequence[Sequence[int]]] = None,
                 attention_mask: Optional[Sequence[Sequence[int]]] = None, texts: Optional[Sequence[str]] = None,
                 seed: Optional[int] = None) -> dict[str, Any]:
        """The batch handler's loss for token ids (rows may differ in length) or texts."""
        ids = self.encode_prompts(texts, input_ids, prompt_field="texts", ids_field="input_ids")
        if any(len(r) < 2 for r in ids):
            raise InvalidInputError("every sequence needs at least 2 tokens to score a next-token loss",
                                    field="input_ids" if input_ids is not None else "texts")
        longest = max(len(r) for r in ids)
        if longest > self.model.max_seq_len + 1:
            raise InvalidInputError(f"sequences are limited to max_seq_len + 1 = {self.model.max_seq_len + 1} "
                                    f"tokens; got {longest}", field="input_ids" if input_ids is not None else "texts")
        batch_ids, mask = pad_rows(ids, self.pad_token_id)
        if attention_mask is not None:
            if texts is not None:
                raise InvalidInputError("attention_mask goes with input_ids, not texts", field="attention_mask")
            rows = [[int(v) for v in r] for r in attention_mask]
            if [len(r) for r in rows] != [len(r) for r in ids]:
                raise InvalidInputError("attention_mask must have the same shape as input_ids", field="attention_mask")
            if any(v not in (0, 1) for r in rows for v in r):
                raise InvalidInputError("attention_mask values must be 0 or 1", field="attention_mask")
            mask = pad_rows(rows, 0)[0]
            if not bool(mask[:, 1:].any()):
                raise InvalidInputError("attention_mask leaves no token to predict (positions after the first "
                                        "must include at least one 1)", field="attention_mask")
        seed = new_seed() if seed is None else seed
        out = self.batch_handler.compute_loss(self.model, {"input_ids": batch_ids, "attention_mask": mask},
                                              generator=make_generator(self.device, seed))
        return {**out.to_dict(), "seed": seed}
