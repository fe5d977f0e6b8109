"""Tiny Hugging Face models with random weights, built offline and saved in HF format.

The demo pack and the tests need directories that ``AutoModelForCausalLM`` /
``AutoModelForImageTextToText`` and ``AutoTokenizer`` / ``AutoProcessor`` load exactly as
they load a downloaded checkpoint, without any network access. Each builder here makes a
model a few hundred kilobytes in size from a config (weights seeded, so the same seed gives
the same files), pairs it with a copy of the given tokenizer, and ``save_pretrained``s both.

Families: causal LMs (Llama, GPT-2) and image-text-to-text models (Idefics3, the
SmolVLM architecture; LLaVA with a CLIP vision tower and a Llama text model; Qwen2-VL,
whose processor flattens each image's patches and marks its tokens in ``mm_token_type_ids``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Union

import torch

PathLike = Union[str, Path]

# Text model size shared by every family: big enough to exercise attention with several
# heads and layers, small enough that a checkpoint stays well under a megabyte.
TEXT_HIDDEN_SIZE = 32
TEXT_INTERMEDIATE_SIZE = 64
TEXT_LAYERS = 2
TEXT_HEADS = 2
MAX_POSITION_EMBEDDINGS = 128

# Vision towers see 32 px images in 8 px patches: a 4 x 4 patch grid.
IMAGE_SIZE = 32
PATCH_SIZE = 8
VISION_HIDDEN_SIZE = 32
VISION_INTERMEDIATE_SIZE = 64
VISION_LAYERS = 2
VISION_HEADS = 2

# Idefics3 merges scale_factor x scale_factor patches into one token (pixel shuffle).
IDEFICS3_SCALE_FACTOR = 2
IDEFICS3_IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // IDEFICS3_SCALE_FACTOR**2
IDEFICS3_SPECIAL_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")

# LLaVA keeps one token per patch (the CLS token is dropped by the "default" strategy).
LLAVA_IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2
LLAVA_IMAGE_TOKEN = "<image>"

# Qwen2-VL cuts each image into PATCH_SIZE patches (each repeated over 2 frames), and its merger joins
# 2 x 2 neighbours into one token: a 32 px frame is a 1 x 4 x 4 patch grid, 4 tokens. Its image
# processor resizes to multiples of 16 px with an area within [min_pixels, max_pixels].
QWEN2_VL_MERGE_SIZE = 2
QWEN2_VL_TEMPORAL_PATCH_SIZE = 2
QWEN2_VL_IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // QWEN2_VL_MERGE_SIZE**2
QWEN2_VL_MROPE_SECTION = [2, 3, 3]  # temporal, height, width: half the text head dim (32 / 2 heads / 2)
QWEN2_VL_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                           "<|video_pad|>")

CAUSAL_LM_FAMILIES = ("llama", "gpt2")

# Message content may be a plain string or a list of {"type": "text", "text": ...} parts.
CAUSAL_LM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# SmolVLM's layout: "User:<image>text<end_of_utterance>\nAssistant:".
IDEFICS3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# llava-1.5's layout: "USER: <image>\ntext ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


# Qwen2-VL's layout: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>text<|im_end|>\n"
# (the processor repeats <|image_pad|> once per image token).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _vlm_tokenizer(tokenizer: Any, chat_template: str, special_tokens) -> tuple[Any, dict[str, int]]:
    """A copy of ``tokenizer`` with the family's chat template and image tokens, and its special ids."""
    tokenizer = _copy_tokenizer(tokenizer, chat_template)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return tokenizer, _token_ids(tokenizer)


def _copy_tokenizer(tokenizer: Any, chat_template: str) -> Any:
    """A deep copy (the caller's tokenizer stays untouched) with a pad token and a chat template."""
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = chat_template
    return tokenizer


def _token_ids(tokenizer: Any) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _tiny_llama_config(vocab_size: int, token_ids: dict[str, int]):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=TEXT_INTERMEDIATE_SIZE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_HEADS,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        tie_word_embeddings=False,
        **token_ids,
    )


def _seeded_model(model_class: Any, config: Any, seed: int) -> Any:
    """The model with weights drawn from ``seed`` without disturbing the caller's RNG state."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval()


def _save(model: Any, token_ids: dict[str, int], out_dir: PathLike, *artifacts: Any) -> Path:
    """Saves the model with a generation config that stops at eos, then the tokenizer/processor."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = token_ids["eos_token_id"]
    model.generation_config.pad_token_id = token_ids["pad_token_id"]
    model.generation_config.bos_token_id = token_ids["bos_token_id"]
    model.save_pretrained(out_dir)
    for artifact in artifacts:
        artifact.save_pretrained(out_dir)
    return out_dir


def build_tiny_causal_lm(out_dir: PathLike, tokenizer: Any, *, seed: int = 0, family: str = "llama") -> Path:
    """A random-weight causal LM (``family`` "llama" or "gpt2") saved with a copy of ``tokenizer``.

    Loads back with ``AutoModelForCausalLM`` and ``AutoTokenizer``; the tokenizer gets a chat
    template and, when it has none, eos as its pad token.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    tokenizer = _copy_tokenizer(tokenizer, CAUSAL_LM_CHAT_TEMPLATE)
    token_ids = _token_ids(tokenizer)
    if family == "llama":
        model = _seeded_model(LlamaForCausalLM, _tiny_llama_config(len(tokenizer), token_ids), seed)
    elif family == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=TEXT_HIDDEN_SIZE,
            n_inner=TEXT_INTERMEDIATE_SIZE,
            n_layer=TEXT_LAYERS,
            n_head=TEXT_HEADS,
            n_positions=MAX_POSITION_EMBEDDINGS,
            **token_ids,
        )
        model = _seeded_model(GPT2LMHeadModel, config, seed)
    else:
        raise ValueError(f"unknown causal LM family {family!r}; expected one of {CAUSAL_LM_FAMILIES}")
    return _save(model, token_ids, out_dir, tokenizer)


def build_tiny_idefics3(out_dir: PathLike, tokenizer: Any, *, seed: int = 0) -> Path:
    """A random-weight Idefics3 (SmolVLM architecture) with its processor.

    Images are squared to 32 px without splitting, so each image becomes
    ``<fake_token_around_image><global-img>`` + 4 x ``<image>`` + ``<fake_token_around_image>``.
    The tokenizer copy gains Idefics3's special tokens and the text vocab is sized to it.
    """
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    tokenizer, token_ids = _vlm_tokenizer(tokenizer, IDEFICS3_CHAT_TEMPLATE, IDEFICS3_SPECIAL_TOKENS)
    vision_config = Idefics3VisionConfig(
        hidden_size=VISION_HIDDEN_SIZE,
        intermediate_size=VISION_INTERMEDIATE_SIZE,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = Idefics3Config(
        vision_config=vision_config.to_dict(),
        text_config=_tiny_llama_config(len(tokenizer), token_ids).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=IDEFICS3_SCALE_FACTOR,
        pad_token_id=token_ids["pad_token_id"],
    )
    model = _seeded_model(Idefics3ForConditionalGeneration, config, seed)
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=IDEFICS3_IMAGE_SEQ_LEN,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    return _save(model, token_ids, out_dir, processor)


def build_tiny_qwen2_vl(out_dir: PathLike, tokenizer: Any, *, seed: int = 0) -> Path:
    """A random-weight Qwen2-VL with its processor.

    A 32 px image becomes a 1 x 4 x 4 grid of 8 px patches (``image_grid_thw``), its pixel values
    16 flattened rows of 3 x 2 x 8 x 8 (every image's rows stacked, not one tensor per image), and
    ``<|vision_start|>`` + 4 x ``<|image_pad|>`` + ``<|vision_end|>`` in the prompt; the processor
    also returns ``mm_token_type_ids`` (1 on the image tokens). The tokenizer copy gains Qwen's
    special tokens, the text vocab is sized to it and the config's token ids are the tokenizer's.
    """
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLTextConfig,
        Qwen2VLVideoProcessor,
        Qwen2VLVisionConfig,
    )

    tokenizer, token_ids = _vlm_tokenizer(tokenizer, QWEN2_VL_CHAT_TEMPLATE, QWEN2_VL_SPECIAL_TOKENS)
    vision_config = Qwen2VLVisionConfig(
        depth=VISION_LAYERS,
        embed_dim=VISION_HIDDEN_SIZE,
        hidden_size=TEXT_HIDDEN_SIZE,  # the merger's output: the text model's width
        mlp_ratio=VISION_INTERMEDIATE_SIZE // VISION_HIDDEN_SIZE,
        num_heads=VISION_HEADS,
        patch_size=PATCH_SIZE,
        spatial_merge_size=QWEN2_VL_MERGE_SIZE,
        temporal_patch_size=QWEN2_VL_TEMPORAL_PATCH_SIZE,
    )
    text_config = Qwen2VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=TEXT_INTERMEDIATE_SIZE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_HEADS,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": QWEN2_VL_MROPE_SECTION},
        **token_ids,
    )
    config = Qwen2VLConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    model = _seeded_model(Qwen2VLForConditionalGeneration, config, seed)
    patch_area = (PATCH_SIZE * QWEN2_VL_MERGE_SIZE) ** 2  # the resize works in multiples of this
    patching = dict(patch_size=PATCH_SIZE, temporal_patch_size=QWEN2_VL_TEMPORAL_PATCH_SIZE,
                    merge_size=QWEN2_VL_MERGE_SIZE)
    image_processor = Qwen2VLImageProcessor(min_pixels=patch_area, max_pixels=IMAGE_SIZE * IMAGE_SIZE, **patching)
    # (the processor requires one; these models see no video here)
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": patch_area, "longest_edge": IMAGE_SIZE * IMAGE_SIZE}, **patching)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    return _save(model, token_ids, out_dir, processor)


def build_tiny_llava(out_dir: PathLike, tokenizer: Any, *, seed: int = 0) -> Path:
    """A random-weight LLaVA (CLIP vision tower, Llama text model) with its processor.

    Images are resized and center-cropped to 32 px; each becomes 16 ``<image>`` tokens (one
    per 8 px patch, CLS dropped). The tokenizer copy gains ``<image>`` as a special token.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer, token_ids = _vlm_tokenizer(tokenizer, LLAVA_CHAT_TEMPLATE, [LLAVA_IMAGE_TOKEN])
    vision_config = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN_SIZE,
        intermediate_size=VISION_INTERMEDIATE_SIZE,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=VISION_HIDDEN_SIZE,
    )
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=_tiny_llama_config(len(tokenizer), token_ids).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
        image_seq_length=LLAVA_IMAGE_SEQ_LEN,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = _seeded_model(LlavaForConditionalGeneration, config, seed)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, which "default" then drops
        image_token=LLAVA_IMAGE_TOKEN,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return _save(model, token_ids, out_dir, processor)


CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def build_tiny_clip(out_dir: PathLike, tokenizer: Any, *, seed: int = 0, text_hidden_size: int = TEXT_HIDDEN_SIZE,
                    max_text_length: int = 32, vision_hidden_size: int = VISION_HIDDEN_SIZE,
                    vision_layers: int = VISION_LAYERS, patch_size: int = PATCH_SIZE) -> Path:
    """A random-weight ``CLIPModel`` (text and vision towers) with a tokenizer that frames every text as
    ``<|startoftext|> … <|endoftext|>`` like CLIP's, saved for ``CLIPModel`` / ``AutoTokenizer``.

    The text config's eos id is the tokenizer's ``<|endoftext|>``, so pooling picks the first eos
    (not the legacy argmax rule, which needs eos id 2).
    """
    from tokenizers.processors import TemplateProcessing
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS})
    bos, eos = tokenizer.convert_tokens_to_ids(CLIP_BOS), tokenizer.convert_tokens_to_ids(CLIP_EOS)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}", special_tokens=[(CLIP_BOS, bos), (CLIP_EOS, eos)])
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=text_hidden_size,
                          intermediate_size=2 * text_hidden_size, num_hidden_layers=TEXT_LAYERS,
                          num_attention_heads=TEXT_HEADS, max_position_embeddings=max_text_length,
                          bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    vision = CLIPVisionConfig(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                              num_hidden_layers=vision_layers, num_attention_heads=VISION_HEADS,
                              image_size=IMAGE_SIZE, patch_size=patch_size)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=TEXT_HIDDEN_SIZE)
    model = _seeded_model(CLIPModel, config, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                       ).save_pretrained(out_dir)
    return out_dir
