"""Finding the tokenizer of a text checkpoint, rendering chat through a chat template, and cleaning up tokenization
spaces in text that grows (streamed text).

In order: the deployment's override, the experiment's ``tokenizer/`` folder (HF tokenizer
files), ``config.yaml``'s ``data.tokenizer`` (a path relative to the experiment or absolute,
or a hub id that is already in the local HF cache), then the model's own default (an HF
wrapper's directory). A checkpoint without any tokenizer still serves token ids.
"""

from __future__ import annotations

import logging
import re
import weakref
from pathlib import Path
from typing import Any, Callable, Optional, Union

from vla_foundry.errors import CheckpointError, InvalidInputError

logger = logging.getLogger(__name__)


def _from_pretrained(source: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def load_tokenizer(experiment_dir: Union[str, Path], override: Optional[str] = None,
                   training_config: Optional[dict] = None,
                   model_default: Optional[str] = None) -> tuple[Any, Optional[str]]:
    """(tokenizer or None, where it came from). An explicit ``override`` that fails is an error.

    ``model_default`` is the model's own last resort (an HF wrapper's directory).
    """
    experiment_dir = Path(experiment_dir)
    if override:
        path = Path(override)
        if not path.is_absolute() and (experiment_dir / path).exists():
            path = experiment_dir / path
        source = str(path) if path.exists() else override
        try:
            return _from_pretrained(source), source
        except Exception as e:
            raise CheckpointError(
                f"tokenizer {override!r} could not be loaded ({type(e).__name__}: {e}). Give a directory with HF "
                "tokenizer files, or a hub id present in the local HF cache.") from e
    bundled = experiment_dir / "tokenizer"
    if bundled.is_dir():
        return _from_pretrained(str(bundled)), str(bundled)
    name = ((training_config or {}).get("data") or {}).get("tokenizer")
    if isinstance(name, str) and name:
        local = experiment_dir / name
        source = str(local) if local.exists() else name
        try:
            return _from_pretrained(source), source
        except Exception as e:  # e.g. "debug", or a hub id that is not cached here
            logger.warning("config names tokenizer %r, which is not available offline (%s)", name, type(e).__name__)
    if model_default:
        try:
            return _from_pretrained(model_default), model_default
        except Exception as e:
            logger.warning("no tokenizer in %s (%s)", model_default, type(e).__name__)
    logger.warning("no tokenizer found for %s; serving token ids only", experiment_dir)
    return None, None


def render_with_template(owner: Any, messages: list[dict]) -> str:
    """``messages`` through ``owner``'s chat template (a tokenizer's or an HF processor's), generation
    prompt added. No template, or one that refuses the conversation, is the caller's error (422)."""
    if owner is None or not getattr(owner, "chat_template", None):
        raise InvalidInputError("this deployment has no chat template: send a plain prompt to /v1/completions (a "
                                "captioner's images go to POST /predict/<its type>, GET /models)", field="messages")
    try:
        return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # e.g. the template's own raise_exception for a role order it does not take
        raise InvalidInputError(f"the chat template could not render these messages ({e})", field="messages") from e


# transformers' ``clean_up_tokenization`` (``PreTrainedTokenizerBase``): these replacements, each over the whole text,
# in this order. Every one removes spaces only.
CLEANUP_REPLACEMENTS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                        (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
# Each replacement, and ones that only an earlier replacement makes (" n ' t" → " n't" → "n't", "  ' m" → " 'm" →
# "'m"): a clean-up that gives here what CLEANUP_REPLACEMENTS give is taken to be transformers' own.
_CLEANUP_PROBE = "a . b ? c ! d , e ' f n't g 'm h 's i 've j 're k n ' t l  ' m  ' s  ' ve  ' re  . ' x"


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_byte_tokens: "weakref.WeakKeyDictionary[Any, frozenset[int]]" = weakref.WeakKeyDictionary()
_skipped_tokens: "weakref.WeakKeyDictionary[Any, frozenset[int]]" = weakref.WeakKeyDictionary()


def _once_per_tokenizer(cache: "weakref.WeakKeyDictionary[Any, frozenset[int]]", tokenizer: Any,
                        read: Callable[[Any], frozenset[int]]) -> frozenset[int]:
    """``read(tokenizer)``, read once per tokenizer (a tokenizer's vocabulary does not change while it serves)."""
    try:
        return cache[tokenizer]
    except (KeyError, TypeError):  # (TypeError: an object that takes no weak reference)
        pass
    ids = read(tokenizer)
    try:
        cache[tokenizer] = ids
    except TypeError:
        pass
    return ids


def byte_fallback_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of a sentencepiece tokenizer's byte tokens (``<0xE6>``: its ``byte_fallback``, as Llama 2's and Mistral's
    have it, for characters outside its vocabulary); empty for other tokenizers. Their decoder turns a run of them
    into text only when the run's bytes are valid UTF-8, and else writes U+FFFD for each byte of the run: a byte that
    extends a run can rewrite characters the run showed before it."""

    def read(tokenizer: Any) -> frozenset[int]:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        return frozenset(i for token, i in vocab.items() if len(token) == 6 and _BYTE_TOKEN.fullmatch(token))

    return _once_per_tokenizer(_byte_tokens, tokenizer, read)


def skipped_ids(tokenizer: Any) -> frozenset[int]:
    """The ids ``decode(..., skip_special_tokens=True)`` leaves out: the special tokens, and every token added as
    special (control tokens added with ``add_tokens(..., special_tokens=True)``, which ``all_special_ids`` does not
    list)."""

    def read(tokenizer: Any) -> frozenset[int]:
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        return frozenset(getattr(tokenizer, "all_special_ids", ()) or ()) | frozenset(
            i for i, token in added.items() if getattr(token, "special", False))

    return _once_per_tokenizer(_skipped_tokens, tokenizer, read)


def clean_up(text: str) -> str:
    """``text`` through CLEANUP_REPLACEMENTS, as transformers' ``clean_up_tokenization`` gives it."""
    for old, new in CLEANUP_REPLACEMENTS:
        text = text.replace(old, new)
    return text


def decode_cleans_up(tokenizer: Any) -> bool:
    """Whether ``tokenizer.decode`` cleans up tokenization spaces (" ." → ".", " 's" → "'s") by default: as its
    ``clean_up_tokenization_spaces`` says, except for a fast tokenizer of a BPE model, whose text transformers 5 leaves
    alone unless ``clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output`` forces it (releases
    without that setting clean up every tokenizer that asks)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        return bool(getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", True))
    return True


def cleans_up_as_transformers(tokenizer: Any) -> bool:
    """Whether the tokenizer's ``clean_up_tokenization`` is transformers' own (a tokenizer class may override it) and
    does what ``CLEANUP_REPLACEMENTS`` do (a transformers release could change it), so that ``SpaceCleanup`` repeats it
    on text that grows."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    if getattr(type(tokenizer), "clean_up_tokenization", None) is not PreTrainedTokenizerBase.clean_up_tokenization:
        return False
    return tokenizer.clean_up_tokenization(_CLEANUP_PROBE) == clean_up(_CLEANUP_PROBE)


class SpaceCleanup:
    """``clean_up`` of a text that grows at its end, kept up to date at a cost per step of the new text only.

    Cleaning up the whole text at every step would cost its length per step, and a clean-up of only the new text
    would miss replacements across the join (" '" then "m": " 'm" → "'m") and could still change text already
    streamed. Here each replacement is a stage over a stream: like ``str.replace``, it scans its input left to right
    and replaces each match it finds, but it holds back the end of its input that is the start of a match (at most
    ``len(old) - 1`` characters, usually none), and hands the rest, replaced, to the next stage. What the last stage has
    handed on (``done``) is therefore final: the clean-up of the whole text, whatever follows, starts with it.
    """

    def __init__(self) -> None:
        self.done = ""  # the clean-up of the text's start, final whatever follows
        self.pending = [""] * len(CLEANUP_REPLACEMENTS)  # per stage, its held-back input (a start of its old)

    def feed(self, text: str) -> None:
        """``text`` appended to the text."""
        for i, (old, new) in enumerate(CLEANUP_REPLACEMENTS):
            buf = self.pending[i] + text
            out, at = [], 0
            while (found := buf.find(old, at)) >= 0:
                out += [buf[at:found], new]
                at = found + len(old)
            # Every match that fits is replaced; of the rest, only a tail that is the start of ``old`` may still
            # begin a match once more text comes: the longest such tail is held back (usually none, so the text
            # streams as it comes).
            keep = len(buf)
            for k in range(min(len(old) - 1, len(buf) - at), 0, -1):
                if buf.endswith(old[:k]):
                    keep -= k
                    break
            out.append(buf[at:keep])
            self.pending[i], text = buf[keep:], "".join(out)
        self.done += text

    def text(self, tail: str = "") -> str:
        """The clean-up of the text followed by ``tail``, were it to end there (``done`` and the held-back rest)."""
        for (old, new), pending in zip(CLEANUP_REPLACEMENTS, self.pending):
            tail = (pending + tail).replace(old, new)
        return self.done + tail
