import logging

import pytest

from vla_foundry.config_files import read_model_config, read_training_config, read_yaml
from vla_foundry.params import get_params_class, list_registered_params, parse_params
from vla_foundry.params.clip import ClipBackboneParams, ViTBackboneParams, VLMBackboneParams
from vla_foundry.params.diffusion import DiffusionPolicyParams, NoiseSchedulerParams, StableDiffusionParams, UNetParams
from vla_foundry.params.transformer import TransformerHFParams, TransformerParams
from vla_foundry.params.vision import ViTHFParams, ViTParams, VLMParams

FIXTURE_NAMES = ["transformer_basic", "vlm_basic", "stable_diffusion_basic", "diffusion_policy_clip_basic"]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_every_fixture_config_parses_and_round_trips(fixtures_dir, name, caplog):
    config = read_model_config(fixtures_dir / name)
    with caplog.at_level(logging.WARNING):
        params = parse_params(config)
    assert not caplog.records, "fixture configs hold only known keys"
    assert params.type == config["type"]
    assert params.to_dict() == _normalised(config)
    # config.yaml's model: block says the same as config_model.yaml
    assert parse_params(read_training_config(fixtures_dir / name)["model"]).to_dict() == params.to_dict()


def _normalised(config):
    out = {}
    for k, v in config.items():
        out[k] = _normalised(v) if isinstance(v, dict) else v
    return dict(sorted(out.items()))


def test_fixture_params_select_nested_classes(fixtures_dir):
    vlm = parse_params(read_model_config(fixtures_dir / "vlm_basic"))
    assert isinstance(vlm, VLMParams) and isinstance(vlm.vit, ViTParams)
    assert isinstance(vlm.transformer, TransformerParams)
    assert (vlm.image_token_id, vlm.vit.projector_pixel_shuffle_factor, vlm.vit.patch_size) == (255, 2, 8)

    sd = parse_params(read_model_config(fixtures_dir / "stable_diffusion_basic"))
    assert isinstance(sd, StableDiffusionParams) and isinstance(sd.unet, UNetParams)
    assert sd.unet.channels == [8, 16, 16] and sd.noise_scheduler.num_timesteps == 10
    assert sd.noise_scheduler.clamp_range == (-1.5, 1.5) and sd.clip.type == "clip_hf" and sd.clip.hf_pretrained is None

    dp = parse_params(read_model_config(fixtures_dir / "diffusion_policy_clip_basic"))
    assert isinstance(dp, DiffusionPolicyParams) and isinstance(dp.vision_language_backbone, ClipBackboneParams)
    assert dp.vision_language_backbone.hf_pretrained == "clip_tiny"
    assert dp.transformer.is_causal is False and dp.noise_scheduler.clamp_range == (-3.0, 3.0)
    assert (dp.action_dim, dp.proprioception_dim, dp.use_flow_matching_scheduler) == (4, 3, True)


def test_defaults_follow_the_format_spec():
    p = parse_params({"type": "transformer"})
    assert (p.hidden_dim, p.n_layers, p.n_heads, p.vocab_size, p.max_seq_len) == (96, 8, 4, 50432, 2048)
    assert (p.norm_type, p.norm_eps, p.ffn_type, p.positional_embedding_type) == \
        ("default_layer_norm", 1e-5, "swiglu", "rotary")
    assert p.is_causal and not p.weight_tying and not p.qk_norm
    v = parse_params({"type": "vit"})
    assert (v.img_size, v.patch_size, v.hidden_dim, v.inter_dim, v.ln_eps) == (384, 16, 768, 3072, 1e-6)
    ns = parse_params({"type": "noise_scheduler"})
    assert isinstance(ns, NoiseSchedulerParams) and ns.num_timesteps == 1000 and ns.clamp_range == (-1.5, 1.5)


def test_unknown_keys_are_ignored_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING):
        p = parse_params({"type": "vlm", "shiny": 1, "vit": {"type": "vit", "sparkle": 2},
                          "transformer": {"type": "transformer", "hidden_dim": 64}})
    assert p.transformer.hidden_dim == 64
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "shiny" in warnings[0].getMessage() and "vit.sparkle" in warnings[0].getMessage()


def test_nested_blocks_without_type_follow_the_spec():
    p = parse_params({"type": "vlm", "image_token_id": 5, "vit": {"hf_pretrained": "timm/vit"},
                      "transformer": {"hidden_dim": 64}})
    assert isinstance(p.vit, ViTHFParams) and isinstance(p.transformer, TransformerParams)
    p = parse_params({"type": "vlm", "vit": {}, "transformer": {"hf_pretrained": "some/lm"}})
    assert isinstance(p.vit, ViTParams) and isinstance(p.transformer, TransformerHFParams)
    # vision_language_backbone: absent ⇒ clip_backbone; a block without type ⇒ vlm_backbone; else by type
    dp = parse_params({"type": "diffusion_policy", "transformer": {}})
    assert isinstance(dp.vision_language_backbone, ClipBackboneParams)
    dp = parse_params({"type": "diffusion_policy", "transformer": {},
                       "vision_language_backbone": {"hf_pretrained": "x"}})
    assert type(dp.vision_language_backbone) is VLMBackboneParams
    dp = parse_params({"type": "diffusion_policy", "transformer": {},
                       "vision_language_backbone": {"type": "vit_backbone", "img_size": 64}})
    assert isinstance(dp.vision_language_backbone, ViTBackboneParams) and dp.vision_language_backbone.img_size == 64


def test_missing_required_block_and_unknown_type_are_clear():
    with pytest.raises(ValueError, match="needs a `transformer:` block"):
        parse_params({"type": "diffusion_policy"})
    with pytest.raises(ValueError, match="unknown params type 'transfomer'.*closest is 'transformer'"):
        parse_params({"type": "transfomer"})
    with pytest.raises(ValueError, match="no `type:`"):
        parse_params({"hidden_dim": 3})


@pytest.mark.parametrize("config, message", [
    ({"type": "stable_diffusion", "noise_scheduler": {"clamp_range": 1.5}},
     r"`noise_scheduler`: `clamp_range` must be two numbers \[low, high\].*got 1.5"),
    ({"type": "stable_diffusion", "noise_scheduler": {"clamp_range": [-1, 0, 1]}}, r"`clamp_range` must be two"),
    ({"type": "stable_diffusion", "noise_scheduler": {"clamp_range": [1, -1]}}, r"low <= high"),
    ({"type": "stable_diffusion", "unet": {"channels": 16}}, r"`unet`: `channels` must be a list of positive"),
    ({"type": "stable_diffusion", "unet": {"channels": [32, 0]}}, r"`channels` must be a list of positive"),
    ({"type": "transformer", "n_heads": 0}, r"^`n_heads` must be a positive integer; got 0$"),
    ({"type": "vlm", "vit": {"patch_size": 0}, "transformer": {}}, r"`vit`: `patch_size` must be a positive"),
    ({"type": "vlm", "vit": "vit", "transformer": {}}, r"key `vit` must be a block .*got 'vit' \(str\)"),
    ({"type": "stable_diffusion", "noise_scheduler": {"num_timesteps": -3}}, r"`num_timesteps` must be a positive"),
])
def test_malformed_values_are_refused_naming_their_key_and_what_is_allowed(config, message):
    """They failed deep inside the model (a TypeError, a ZeroDivisionError, an AttributeError) naming no key."""
    with pytest.raises(ValueError, match=message):
        parse_params(config)


def test_a_null_nested_block_reads_as_an_absent_one():
    assert parse_params({"type": "stable_diffusion", "noise_scheduler": None}).noise_scheduler == \
        parse_params({"type": "stable_diffusion"}).noise_scheduler
    assert parse_params({"type": "stable_diffusion", "clip": None}).clip == \
        parse_params({"type": "stable_diffusion"}).clip


def test_scalars_are_coerced_like_the_reference():
    p = parse_params({"type": "transformer", "norm_eps": "1e-6"})  # PyYAML reads 1e-6 as a string
    assert p.norm_eps == pytest.approx(1e-6)


def test_every_registered_model_type_has_params():
    from vla_foundry.models import list_registered_models

    for key in list_registered_models():
        assert get_params_class(key).type_key == key
    for key in ["transformer", "transformer_hf", "vit", "vit_hf", "vlm", "vlm_hf", "clip_hf", "clip_openclip",
                "clip_backbone", "vit_backbone", "vlm_backbone", "vlm_foundry_backbone", "unet", "noise_scheduler",
                "stable_diffusion", "diffusion_policy"]:
        assert key in list_registered_params()


def test_yaml_include(tmp_path):
    (tmp_path / "lm.yaml").write_text("type: transformer\nhidden_dim: 48\n")
    (tmp_path / "base.yaml").write_text("n_layers: 3\nn_heads: 4\n")
    (tmp_path / "config_model.yaml").write_text(
        "type: vlm\nvit: {type: vit}\ntransformer: !include lm.yaml\n")
    (tmp_path / "merged.yaml").write_text("<<: !include base.yaml\ntype: transformer\nhidden_dim: 16\n")
    p = parse_params(read_model_config(tmp_path))
    assert p.transformer.hidden_dim == 48
    merged = parse_params(read_yaml(tmp_path / "merged.yaml"))
    assert (merged.n_layers, merged.n_heads, merged.hidden_dim) == (3, 4, 16)
