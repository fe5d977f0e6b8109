"""Images from prompts, and the denoising loss, for the ``image`` modality (``stable_diffusion``).

Each image gets its own generator (``seed + i``), so an image depends on its seed alone —
not on how many images share its request or which requests ran before it. Every call
builds its own sampler, so concurrent requests never share scheduler state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from vla_foundry.errors import InvalidInputError
from vla_foundry.models.registry import create_batch_handler
from vla_foundry.models.stable_diffusion import TRAINING
from vla_foundry.pipelines.base import Pipeline, register_pipeline
from vla_foundry.pipelines.text import make_generator, new_seed

SEED_SPACE = 2**63
DEFAULT_FAST_STEPS = 20


@dataclass
class ImageRequest:
    """One request for images, as a client states it (None: the model's default)."""

    prompt: Optional[str] = None
    negative_prompt: Optional[str] = None
    num_images: int = 1
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    scheduler: Optional[str] = None
    seed: Optional[int] = None


@dataclass
class ImagePlan:
    """A checked request: everything resolved, one seed per image."""

    prompt: Optional[str]
    negative_prompt: str
    scheduler: str
    num_inference_steps: int
    guidance_scale: Optional[float]  # the guidance applied (None: none)
    seeds: list[int]

    @property
    def sampling_key(self) -> tuple:
        """What plans must agree on to share one model call."""
        return (self.scheduler, self.num_inference_steps, self.guidance_scale, self.prompt is None)


@dataclass
class ImageResult:
    images: list[np.ndarray]  # (S, S, C) uint8 each
    seeds: list[int]  # the seed of each image
    scheduler: str
    num_inference_steps: int
    guidance_scale: Optional[float]


@register_pipeline("image")
class ImagePipeline(Pipeline):
    max_images_per_call = 32  # batched requests' images go through the UNet this many at a time (×2 with guidance)
    def __init__(self, model, max_text_seq_len: int = 64):
        super().__init__(model)
        self.max_text_seq_len = max_text_seq_len
        self.batch_handler = create_batch_handler(model.params.type, dropout_percent=model.params.dropout_percent)

    @classmethod
    def from_experiment(cls, model, experiment_dir: Path, *, training_config: Optional[dict] = None,
                        **_: Any) -> "ImagePipeline":
        data = (training_config or {}).get("data") or {}
        return cls(model, max_text_seq_len=int(data.get("max_text_seq_len") or 64))

    @property
    def max_prompt_tokens(self) -> Optional[int]:
        return min(self.max_text_seq_len, self.model.clip.max_text_length) if self.model.has_text else None

    def default_steps(self, scheduler: str) -> int:
        return self.model.num_timesteps - 1 if scheduler == TRAINING else min(DEFAULT_FAST_STEPS,
                                                                                self.model.num_timesteps)

    def io(self) -> dict[str, Any]:
        p = self.model.params
        return {
            "image_size": self.model.image_size, "channels": p.unet.out_channels,
            "text": self.model.has_text, "max_prompt_tokens": self.max_prompt_tokens,
            "num_train_timesteps": self.model.num_timesteps,
            "schedulers": list(self.model.schedulers), "default_scheduler": self.model.default_scheduler,
            "defaults": {"num_inference_steps": self.default_steps(self.model.default_scheduler),
                         "guidance_scale": p.guidance_scale if p.do_classifier_free_guidance else None},
            "training_steps": self.model.num_timesteps - 1,
        }

    def warmup(self, max_batch_size: int = 1) -> None:
        self.generate(num_images=1, num_inference_steps=2, seed=0)

    # ------------------------------------------------------------------ generate

    def plan(self, request: ImageRequest, max_inference_steps: Optional[int] = None) -> ImagePlan:
        """``request`` checked and resolved (scheduler, steps, guidance, one seed per image).

        ``max_inference_steps``: the server's cap on the sampler steps that will actually run (the
        training scheduler's T−1 and the default count included)."""
        model = self.model
        prompt, negative_prompt, guidance_scale = request.prompt, request.negative_prompt, request.guidance_scale
        if prompt is not None and not model.has_text:
            raise InvalidInputError("this model is unconditional (no text encoder, or a use_diffusers_unet UNet, "
                                    "which takes no text); omit `prompt`", field="prompt")
        if prompt is not None and not prompt.strip():
            raise InvalidInputError("`prompt` is empty; give some text, or omit it for an unconditional sample",
                                    field="prompt")
        if negative_prompt is not None and prompt is None:
            raise InvalidInputError("`negative_prompt` needs a `prompt`", field="negative_prompt")
        for text, field in ((prompt, "prompt"), (negative_prompt, "negative_prompt")):
            if text is not None:  # too long is refused here, before the request can join (and fail) a batch
                model.clip.tokenize([text], self.max_text_seq_len, field=field)
        if guidance_scale is not None and guidance_scale < 0:
            raise InvalidInputError(f"guidance_scale must be >= 0; got {guidance_scale}", field="guidance_scale")
        if negative_prompt is not None and guidance_scale is None and not model.params.do_classifier_free_guidance:
            guidance_scale = model.params.guidance_scale  # a negative prompt only acts through guidance
        scheduler = request.scheduler or model.default_scheduler
        if scheduler not in model.schedulers:
            raise InvalidInputError(f"unknown scheduler {scheduler!r}; this model takes "
                                    f"{', '.join(model.schedulers)}", field="scheduler")
        steps = request.num_inference_steps
        steps = steps if steps is not None else self.default_steps(scheduler)
        if scheduler == TRAINING and steps != model.num_timesteps - 1:
            raise InvalidInputError(f"the training scheduler runs all {model.num_timesteps - 1} steps; omit "
                                    f"num_inference_steps or pick a fast scheduler", field="num_inference_steps")
        if max_inference_steps is not None and steps > max_inference_steps:
            raise InvalidInputError(
                f"this request would run {steps} sampler steps, over this server's limit of {max_inference_steps} "
                "(VLA_MAX_INFERENCE_STEPS); " + ("pick a fast scheduler" if scheduler == TRAINING else
                                                 "ask for fewer num_inference_steps"),
                field="scheduler" if scheduler == TRAINING else "num_inference_steps")
        if scheduler != TRAINING and not 1 <= steps <= model.num_timesteps:
            raise InvalidInputError(f"num_inference_steps must be in [1, {model.num_timesteps}] (the training "
                                    f"timesteps); got {steps}", field="num_inference_steps")
        if prompt is not None and guidance_scale is None and model.params.do_classifier_free_guidance:
            guidance_scale = model.params.guidance_scale
        applied = guidance_scale if (prompt is not None and model.has_text) else None
        seed = new_seed() if request.seed is None else request.seed
        seeds = [(seed + i) % SEED_SPACE for i in range(request.num_images)]
        return ImagePlan(prompt, negative_prompt or "", scheduler, steps, applied, seeds)

    @torch.inference_mode()
    def generate(self, prompt: Optional[str] = None, negative_prompt: Optional[str] = None, num_images: int = 1,
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 scheduler: Optional[str] = None, seed: Optional[int] = None,
                 max_inference_steps: Optional[int] = None) -> ImageResult:
        """Images for one request (see ``plan`` for the checks)."""
        request = ImageRequest(prompt, negative_prompt, num_images, num_inference_steps, guidance_scale, scheduler,
                               seed)
        return self.generate_each([self.plan(request, max_inference_steps)])[0]

    @torch.inference_mode()
    def generate_each(self, plans: Sequence[ImagePlan]) -> list[ImageResult]:
        """Several requests' images; plans that share a sampler, step count and guidance share one model call.
        Every image draws from its own generator, so each request gets what it gets alone."""
        results: list[Optional[ImageResult]] = [None] * len(plans)
        groups: dict[tuple, list[int]] = {}
        for i, plan in enumerate(plans):
            groups.setdefault(plan.sampling_key, []).append(i)
        for indices in groups.values():
            group = [plans[i] for i in indices]
            first = group[0]
            images = [(plan, seed) for plan in group for seed in plan.seeds]
            pixels = []
            for start in range(0, len(images), self.max_images_per_call):  # bounded memory per model call
                chunk = images[start:start + self.max_images_per_call]
                out = self.model.generate(
                    len(chunk), self.device, prompt=None if first.prompt is None else [p.prompt for p, _ in chunk],
                    uncond_prompt=[p.negative_prompt for p, _ in chunk], max_text_seq_len=self.max_text_seq_len,
                    guidance_scale=first.guidance_scale, generator=[make_generator(self.device, s) for _, s in chunk],
                    scheduler=first.scheduler, num_inference_steps=first.num_inference_steps)
                pixels.extend(out.images.cpu().numpy())
            pixels = iter(pixels)
            for i, plan in zip(indices, group):
                results[i] = ImageResult([next(pixels) for _ in plan.seeds], plan.seeds, plan.scheduler,
                                         plan.num_inference_steps, plan.guidance_scale)
        return results

    # ------------------------------------------------------------------ evaluate

    def pixels(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 → (C, S, S) in [-1, 1], resized (bicubic) to the model's size; C the model's channels (1:
        the image in grey, as a grey model's images come out, ITU-R 601 luma)."""
        from PIL import Image

        size, channels = self.model.image_size, self.model.params.unet.in_channels
        picture = Image.fromarray(image)
        if channels == 1:
            picture = picture.convert("L")
        elif channels != 3:  # (no image file has another count a model of this family could be fed)
            raise InvalidInputError(f"this model takes {channels}-channel images, which cannot be made from an image "
                                    "file; it is evaluated from 1- or 3-channel models only", field="images")
        if image.shape[:2] != (size, size):
            picture = picture.resize((size, size), Image.Resampling.BICUBIC)
        array = np.asarray(picture, dtype=np.uint8).reshape(size, size, channels)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0

    @torch.inference_mode()
    def evaluate(self, images: Sequence[np.ndarray], texts: Optional[Sequence[str]] = None,
                 seed: Optional[int] = None) -> dict[str, Any]:
        """The denoising loss of ``images`` (with their captions for text models) at seeded timesteps."""
        if not images:
            raise InvalidInputError("send at least one image", field="images")
        batch: dict[str, torch.Tensor] = {"pixel_values": torch.stack([self.pixels(im) for im in images])}
        if self.model.has_text:
            if texts is None or len(texts) != len(images):
                raise InvalidInputError(f"a text-conditioned model scores images with their captions: send "
                                        f"`texts`, one per image ({len(images)})", field="texts")
            batch["input_ids"], batch["attention_mask"] = self.model.clip.tokenize(
                list(texts), self.max_text_seq_len, field="texts", with_mask=True)
        elif texts is not None:
            raise InvalidInputError("this model is unconditional; omit `texts`", field="texts")
        seed = new_seed() if seed is None else seed
        out = self.batch_handler.compute_loss(self.model, batch, generator=make_generator(self.device, seed))
        return {"loss": out.loss.item(), "num_samples": out.num_samples, "seed": seed}
