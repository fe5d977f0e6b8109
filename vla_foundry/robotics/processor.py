"""Raw observations → policy inputs (format spec §8.3, §12.3).

Camera frames are first brought to the training data's size (``resize_images_size`` with
``image_resizing_method``), then through the checkpoint's processor: an HF processor
directory (resize, crop, normalize; its tokenizer for the prompt), open_clip's transforms,
or ``"none"`` (raw pixels as float 0…255 resized to ``image_size``). The prompt of a
processor without a chat template is one ``<image>`` per image, then the instruction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from vla_foundry.errors import InvalidInputError

RESIZE_METHODS = ("center_crop", "resize_no_crop", "resize_fit")
IMAGE_TOKEN = "<image>"
TOKEN_COUNT_CACHE_SIZE = 4096  # distinct prompts whose token counts, and token rows, are kept (a fleet's instructions)


def _pil_resize(image: np.ndarray, height: int, width: int, bicubic: bool = False) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC if bicubic else Image.BILINEAR))


def resize_image(image: np.ndarray, size: Optional[Sequence[int]], method: str = "center_crop") -> np.ndarray:
    """(h, w, 3) uint8 → (H, W, 3) uint8; ``size`` is (H, W), None or the image's own size leaves it as is.

    ``center_crop``: scale to cover (H, W) keeping the aspect ratio, then crop the centre.
    ``resize_no_crop``: scale each side to (H, W) (the aspect ratio may change).
    ``resize_fit``: scale to fit inside (H, W) keeping the aspect ratio, then pad with black, centred.
    """
    if size is None:
        return image
    H, W = int(size[0]), int(size[1])
    h, w = image.shape[:2]
    if (h, w) == (H, W):
        return image
    if method == "resize_no_crop":
        return _pil_resize(image, H, W)
    if method == "center_crop":
        # The centred box of the target's aspect ratio, in source pixels, resized once: never an upscaled
        # copy of the whole frame (a thin frame would make that huge).
        scale = max(H / h, W / w)
        bh, bw = min(h, H / scale), min(w, W / scale)
        top, left = (h - bh) / 2, (w - bw) / 2
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((W, H), Image.BILINEAR,
                                                        box=(left, top, left + bw, top + bh)))
    if method == "resize_fit":
        scale = min(H / h, W / w)
        nh, nw = max(1, min(H, round(h * scale))), max(1, min(W, round(w * scale)))
        out = np.zeros((H, W, 3), dtype=np.uint8)
        top, left = (H - nh) // 2, (W - nw) // 2
        out[top:top + nh, left:left + nw] = _pil_resize(image, nh, nw)
        return out
    raise ValueError(f"image_resizing_method {method!r} is unknown; one of {', '.join(RESIZE_METHODS)}")


def center_crop(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    H, W = int(shape[0]), int(shape[1])
    h, w = image.shape[:2]
    if H > h or W > w:
        return image
    top, left = (h - H) // 2, (w - W) // 2
    return image[top:top + H, left:left + W]


def prompt_for(instruction: str, num_images: int) -> str:
    """``"<image> " · N + instruction`` (processors without a chat template, e.g. CLIP)."""
    return f"{IMAGE_TOKEN} " * num_images + instruction


class InputProcessor:
    """Images (H, W, 3) uint8 → pixel values; prompts → (input_ids, attention_mask).

    ``image_fn`` maps a flat list of frames to (n, 3, h, w); ``text_fn`` maps prompts to
    ids and mask, or is None for a backbone that ignores text (it still needs the batch
    size, so it gets one placeholder id per row).
    """

    def __init__(self, image_fn: Optional[Callable[[list], torch.Tensor]],
                 text_fn: Optional[Callable[[list[str], Optional[int]], tuple[torch.Tensor, torch.Tensor]]],
                 text_pad_id: Optional[int] = None, *,
                 joint_fn: Optional[Callable[[list[list[np.ndarray]], list[str]], dict[str, torch.Tensor]]] = None):
        self.image_fn = image_fn
        self.text_fn = text_fn
        # A VLM's processor lays out each sample's images and prompt together (``hf_vlm_processor``): per sample
        # its frames and instruction → input_ids, attention_mask, pixel_values and whatever else the model takes.
        self.joint_fn = joint_fn
        self.text_pad_id = text_pad_id  # what ``text_fn`` pads shorter rows with, on the right; None: it cannot
        # Token counts of prompts seen: a robot repeats its instruction every step, and tokenizing it again to
        # check its length cost more than the policy's whole sampling call (bounded; cleared when full).
        self._token_counts: dict[str, int] = {}
        # And their unpadded rows (ids, mask) per cut, for ``text``: on a busy server the tokenizer's call on the
        # model thread (its Python, and the interpreter lock handed back and taken again) cost about 5 % of a
        # fleet's throughput (the demo policy, 16 robots, 2-core CPU). Bounded as above.
        self._rows: dict[tuple[str, Optional[int]], tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def pad_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids and mask padded on the right to ``length`` columns, as ``text_fn`` pads the shorter prompts of a
        batch (so the model reads them alike); unchanged when this processor does not pad or they are as long."""
        extra = length - input_ids.shape[1]
        if self.text_pad_id is None or extra <= 0:
            return input_ids, attention_mask
        ids = torch.cat([input_ids, input_ids.new_full((input_ids.shape[0], extra), self.text_pad_id)], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_zeros((attention_mask.shape[0], extra))], dim=1)
        return ids, mask

    def token_counts(self, prompts: list[str]) -> list[int]:
        """How many tokens ``text_fn`` makes of each prompt (uncut); prompts seen before are not tokenized again."""
        known = {p: self._token_counts[p] for p in set(prompts) if p in self._token_counts}
        missing = sorted(set(prompts) - known.keys())
        if missing:
            _, mask = self.text_fn(missing, None)
            new = dict(zip(missing, mask.sum(dim=1).tolist()))
            if len(self._token_counts) + len(new) > TOKEN_COUNT_CACHE_SIZE:
                self._token_counts.clear()
            self._token_counts.update(new)
            known.update(new)
        return [known[p] for p in prompts]

    def pixel_values(self, frames: list[np.ndarray], device: Optional[torch.device] = None) -> torch.Tensor:
        """(n, 3, h, w) float pixels. Raw pixels (processor ``"none"``) are made on ``device`` (default: the CPU),
        from uint8 frames copied there; other processors' floats stay on the CPU, where the caller's single
        ``.to(device, dtype)`` casts before it copies (half the bytes for a bfloat16 model)."""
        if isinstance(self.image_fn, RawPixels):
            return self.image_fn(frames, device)
        return self.image_fn(frames)

    def text(self, prompts: list[str], max_length: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids and mask (B, L) of ``prompts``, cut at ``max_length``, padded to the longest: what ``text_fn`` gives.
        Where it pads on the right, each distinct prompt is tokenized once and its row kept, and a batch is those
        rows padded as ``text_fn`` pads them; otherwise every call tokenizes."""
        if self.text_fn is None:
            ids = torch.zeros(len(prompts), 1, dtype=torch.long)
            return ids, torch.ones_like(ids)
        if self.text_pad_id is None:
            return self.text_fn(prompts, max_length)
        known = {p: self._rows.get((p, max_length)) for p in set(prompts)}  # read once: another thread may clear
        missing = sorted(p for p, row in known.items() if row is None)
        if missing:
            ids, mask = self.text_fn(missing, max_length)
            if len(self._rows) + len(missing) > TOKEN_COUNT_CACHE_SIZE:
                self._rows.clear()
            for prompt, row_ids, row_mask in zip(missing, ids.tolist(), mask.tolist()):
                n = sum(row_mask)  # padded on the right: the row's own tokens come first
                known[prompt] = self._rows[(prompt, max_length)] = tuple(row_ids[:n]), tuple(row_mask[:n])
            if missing == list(prompts):  # (the batch just tokenized, as it came: nothing to assemble)
                return ids, mask
        rows = [known[p] for p in prompts]
        length = max(len(row_ids) for row_ids, _ in rows)
        pad = (self.text_pad_id,)
        return (torch.tensor([row_ids + pad * (length - len(row_ids)) for row_ids, _ in rows], dtype=torch.long),
                torch.tensor([row_mask + (0,) * (length - len(row_mask)) for _, row_mask in rows], dtype=torch.long))


class RawPixels:
    """Processor ``"none"``: float 0…255 pixels, (n, 3, S, S) resized to ``image_size``. The resize is PIL's
    bicubic, as VLA Foundry's pass-through processor resizes a frame (``Image.resize`` with PIL's default filter
    for RGB); a frame already S × S is left as it is, there too.

    With a ``device``, the resized uint8 frames (n, S, S, 3) are copied to it and become floats there:
    a quarter of float32's bytes to copy, and no conversion on the host (a CPU-to-GPU copy that changes the
    dtype or the layout does that work on the host first; for 16 robots' three 224 px cameras, 29 MB of
    float32). The values are the same either way: every uint8 is exact in float32, bfloat16 and float16.
    """

    def __init__(self, image_size: Optional[int]):
        self.size = (image_size, image_size) if image_size else None

    def resize(self, frame: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8 → (S, S, 3) uint8."""
        if self.size is None or frame.shape[:2] == self.size:
            return frame
        return _pil_resize(frame, *self.size, bicubic=True)

    def frames(self, frames: list[np.ndarray], device: Optional[torch.device] = None) -> torch.Tensor:
        """(n, S, S, 3) uint8, contiguous, on ``device`` when one is given (one plain copy there). Stacked by torch,
        which lets go of the interpreter lock once for the whole copy, where numpy's stack lets go of it for each
        frame and must take it back each time: beside another busy Python thread (a server's event loop), 48
        frames of 224 px (16 robots' three cameras) took 11-16 ms with torch against 150-161 ms with numpy on
        the 2-core CPU (alone, 0.2-2.7 ms with torch and 0.2 with numpy; ``bench/frame_stacking.py``)."""
        pixels = torch.stack([torch.from_numpy(_shareable(self.resize(f))) for f in frames])
        return pixels.to(device) if device is not None else pixels

    def __call__(self, frames: list[np.ndarray], device: Optional[torch.device] = None) -> torch.Tensor:
        return self.frames(frames, device).permute(0, 3, 1, 2).float()


def _shareable(frame: np.ndarray) -> np.ndarray:
    """``frame`` itself where torch can share its memory (writable, no negative stride: a cropped view is fine),
    else a copy that it can: torch takes no negative strides (a flipped view) and warns on read-only arrays (as
    PIL gives them). For ``RawPixels`` and the HF processors, which make tensors of the arrays."""
    return frame if frame.flags.writeable and min(frame.strides) >= 0 else frame.copy()


def hf_tokenizer_text(tokenizer, kwargs: Optional[dict] = None) -> Callable:
    """Prompts → ids and mask as the reference calls the HF processor: padded to the longest, cut at
    ``max_length`` when one is set, with the data config's ``processor_kwargs`` (``tokenizer`` may be the
    processor itself, which passes the tokenizer those that are its own)."""

    def text_fn(prompts: list[str], max_length: Optional[int]):
        enc = tokenizer(text=list(prompts), padding=True, truncation=max_length is not None, max_length=max_length,
                        return_tensors="pt", **(kwargs or {}))
        return enc["input_ids"], enc["attention_mask"]

    return text_fn


@dataclass(frozen=True)
class HFProcessorLoading:
    """How VLA Foundry's ``get_processor`` loads a data config's HF processor directory.

    ``use_fast`` is the data config's ``use_hf_fast_tokenizer`` (default true): the fast (torchvision) image
    processor and tokenizer, else the PIL ones, whose pixels differ (by about 0.015 after normalization for a CLIP
    processor), so a checkpoint is served with the kind it was trained with. ``image_seq_length``: PaliGemma's image
    placeholders per image, the config's ``img_num_tokens`` where its processor names PaliGemma (None: the
    processor's own).
    """

    use_fast: bool = True
    image_seq_length: Optional[int] = None

    @classmethod
    def from_data_config(cls, data: dict) -> "HFProcessorLoading":
        """From a data config block (``config_processor.yaml``, or ``config.yaml``'s ``data:``)."""
        name = str(data.get("processor") or "")
        tokens = data.get("img_num_tokens")
        return cls(use_fast=bool(data.get("use_hf_fast_tokenizer", True)),
                   image_seq_length=int(tokens) if tokens and "paligemma" in name.lower() else None)


def load_hf_processor(path: str, loading: HFProcessorLoading = HFProcessorLoading()) -> Any:
    """``AutoProcessor`` from ``path`` as ``loading`` says, with the ``use_fast`` VLA Foundry passes. transformers 5
    loads the fast kind by default and logs a deprecation notice for ``use_fast``, so there it is passed only when
    false (its replacement, ``backend="pil"``, fails for processors with a video part, e.g. Qwen2-VL's)."""
    import transformers
    from transformers import AutoProcessor

    default_fast = int(transformers.__version__.split(".")[0]) >= 5
    choice = {} if default_fast and loading.use_fast else {"use_fast": loading.use_fast}
    try:
        processor = AutoProcessor.from_pretrained(path, **choice)
    except (OSError, ValueError) as e:
        raise ValueError(f"the HF processor {path!r} cannot be loaded ({e}); the experiment directory should hold "
                         "it (the data config's `processor:`; a policy's is in config_processor.yaml)") from e
    if loading.image_seq_length and hasattr(processor, "image_seq_length"):
        processor.image_seq_length = loading.image_seq_length
    return processor


def hf_processor(path: str, processor_kwargs: Optional[dict] = None,
                 loading: HFProcessorLoading = HFProcessorLoading()) -> InputProcessor:
    """An HF processor directory (e.g. a CLIPProcessor): its image processor and tokenizer. A processor of both is
    called itself, for the images and for the prompts, as the reference calls it with ``processor_kwargs`` (spec
    §8.3): it gives each part the kwargs that are that part's (``add_special_tokens`` to the tokenizer only)."""
    processor = load_hf_processor(path, loading)
    kwargs = dict(processor_kwargs or {})
    tokenizer = getattr(processor, "tokenizer", None)
    joint = tokenizer is not None and hasattr(processor, "image_processor")
    images_by = processor if joint else getattr(processor, "image_processor", processor)

    def image_fn(frames: list[np.ndarray]) -> torch.Tensor:
        frames = [_shareable(f) for f in frames]  # (HF's image processors make tensors of the arrays)
        # Frames are (H, W, 3): said so, or the processor guesses, and reads one 1, 3 or 4 pixels tall as channels
        # first.
        return images_by(images=frames, return_tensors="pt",
                         **{"input_data_format": "channels_last", **kwargs})["pixel_values"]

    return InputProcessor(image_fn, hf_tokenizer_text(processor if joint else tokenizer, kwargs)
                          if tokenizer is not None else None, text_pad_id(tokenizer))


def hf_vlm_processor(path: str, processor_kwargs: Optional[dict] = None,
                     loading: HFProcessorLoading = HFProcessorLoading()) -> InputProcessor:
    """A VLM's HF processor directory, used as VLA Foundry's robotics processor uses it (spec §8.3–§8.4): the
    prompt is one user turn holding an image entry per image, then the instruction, rendered by the processor's
    chat template (else its tokenizer's, else ``"<image> " · N + instruction``, no generation prompt); each
    sample's images and prompt are processed together (the processor expands the image tokens), padded to the
    longest, never cut (VLA Foundry's policy server passes no length)."""
    processor = load_hf_processor(path, loading)
    tokenizer = getattr(processor, "tokenizer", None)
    template = next((owner for owner in (processor, tokenizer) if getattr(owner, "chat_template", None)), None)
    kwargs = dict(processor_kwargs or {})

    def prompt(instruction: str, num_images: int) -> str:
        if template is None:
            return prompt_for(instruction, num_images)
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": instruction}]
        return template.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                            add_generation_prompt=False)

    def joint_fn(images: list[list[np.ndarray]], instructions: list[str]) -> dict[str, torch.Tensor]:
        prompts = [prompt(text, len(frames)) for frames, text in zip(images, instructions)]
        frames = [[_shareable(f) for f in sample] for sample in images]  # (HF's processors make tensors of them)
        out = processor(images=frames, text=prompts, padding=True,
                        return_tensors="pt", **kwargs)
        return {name: value for name, value in out.items() if isinstance(value, torch.Tensor)}

    return InputProcessor(None, None, joint_fn=joint_fn)


def text_pad_id(tokenizer) -> Optional[int]:
    """The id an HF tokenizer pads with, when it pads on the right (None otherwise: no padding is added)."""
    if tokenizer is None or tokenizer.pad_token_id is None or getattr(tokenizer, "padding_side", "right") != "right":
        return None
    return int(tokenizer.pad_token_id)


def check_prompt_length(processor: InputProcessor, prompts: list[str], max_length: Optional[int],
                        fields: list[str]) -> None:
    """Refuse an instruction the tokenizer would cut (the reference truncates silently); ``fields`` name each."""
    if max_length is None or processor.text_fn is None:
        return
    for n, field in zip(processor.token_counts(prompts), fields):
        if n > max_length:
            raise InvalidInputError(f"{field} is {n} tokens with its image placeholders; this policy takes at most "
                                    f"{max_length}; shorten it", field=field)
