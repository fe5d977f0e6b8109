"""Checkpoint-loading fixes: nested ``!include``, tied safetensors, clear errors, the EMA step, and
``use_diffusers_unet`` with a CLIP (format spec §1.1, §1.2, §2.1, §2.2, §11.2)."""

import copy
import shutil

import pytest
import torch

from vla_foundry import load_model, save_experiment
from vla_foundry.checkpoint import load_state_dict_strict
from vla_foundry.config_files import read_model_config
from vla_foundry.errors import CheckpointError
from vla_foundry.params import parse_params
from tests.factories import tiny_model, tiny_transformer_params

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


# ---------------------------------------------------------------- 1. nested !include (spec §1.2)

def test_nested_include_is_relative_to_the_including_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "dims.yaml").write_text("hidden_dim: 64\n")  # a decoy next to the top-level file
    (tmp_path / "sub" / "dims.yaml").write_text("hidden_dim: 32\n")
    (tmp_path / "sub" / "tf.yaml").write_text("type: transformer\narch: !include dims.yaml\n<<: !include dims.yaml\n")
    (tmp_path / "config_model.yaml").write_text("type: vlm\nvit: {type: vit}\ntransformer: !include sub/tf.yaml\n")
    transformer = read_model_config(tmp_path)["transformer"]
    assert transformer["hidden_dim"] == 32 and transformer["arch"] == {"hidden_dim": 32}


def test_missing_nested_include_names_the_including_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "tf.yaml").write_text("type: transformer\n<<: !include nowhere.yaml\n")
    (tmp_path / "config_model.yaml").write_text("type: vlm\ntransformer: !include sub/tf.yaml\n")
    with pytest.raises(CheckpointError, match=r"!include 'nowhere.yaml' in .*sub/tf.yaml: no such file "
                                              r".*sub/nowhere.yaml"):
        read_model_config(tmp_path)


# ---------------------------------------------------------------- 2. tied weights in .safetensors

@pytest.mark.parametrize("kept", ["embeddings.weight", "output.weight"])
def test_safetensors_with_one_name_per_tied_tensor_loads(tmp_path, kept):
    """``safetensors.torch.save_model`` keeps one of the tied names (spec §4.2 keeps both in .pt)."""
    from safetensors.torch import save_file, save_model

    model = tiny_model(tiny_transformer_params(weight_tying=True))
    save_experiment(model, tmp_path)
    (tmp_path / "checkpoints" / "checkpoint_1.pt").unlink()
    file = tmp_path / "checkpoints" / "checkpoint_1.safetensors"
    if kept == "embeddings.weight":
        save_model(model, str(file))
    else:
        dropped = "embeddings.weight"
        save_file({k: v.clone() for k, v in model.state_dict().items() if k != dropped}, str(file))
    loaded = load_model(tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.output.weight is loaded.embeddings.weight


def test_untied_key_missing_from_safetensors_is_still_refused(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model(tiny_transformer_params())
    save_experiment(model, tmp_path)
    (tmp_path / "checkpoints" / "checkpoint_1.pt").unlink()
    save_file({k: v for k, v in model.state_dict().items() if k != "output.weight"},
              str(tmp_path / "checkpoints" / "checkpoint_1.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \(1\): output.weight"):
        load_model(tmp_path)


# ---------------------------------------------------------------- 3. clear errors

def test_missing_relative_clip_folder_names_the_value_and_the_fix(tmp_path, policy_fixture):
    experiment = tmp_path / "policy"
    shutil.copytree(policy_fixture, experiment, ignore=shutil.ignore_patterns("clip_tiny", "expected"))
    with pytest.raises(CheckpointError) as err:
        load_model(experiment)
    message = str(err.value)
    assert "hf_pretrained 'clip_tiny'" in message and "no folder <experiment directory>/clip_tiny" in message
    assert "Publish the CLIP folder" in message


def test_state_dict_that_is_not_a_mapping_names_file_and_key(tmp_path):
    save_experiment(tiny_model(tiny_transformer_params()), tmp_path)
    file = tmp_path / "checkpoints" / "checkpoint_1.pt"
    payload = torch.load(file, weights_only=True)
    payload["state_dict"] = list(payload["state_dict"].values())
    torch.save(payload, file)
    with pytest.raises(CheckpointError, match=r"checkpoint_1.pt: 'state_dict' is a list, not a mapping"):
        load_model(tmp_path)
    payload["state_dict"] = {0: torch.zeros(1)}
    torch.save(payload, file)
    with pytest.raises(CheckpointError, match=r"checkpoint_1.pt \('state_dict'\) has keys that are not parameter"):
        load_model(tmp_path)


@pytest.mark.parametrize("block, message", [
    ({"type": "transformer", "n_layers": "two"}, r"`n_layers` must be int; got 'two' \(str\); write a YAML int "
                                                 r"without quotes"),
    ({"type": "transformer", "n_layers": True}, r"`n_layers` must be int; got True"),
    ({"type": "transformer", "n_layers": 2.5}, r"`n_layers` must be int; got 2.5"),
    ({"type": "transformer", "norm_eps": "small"}, r"`norm_eps` must be float; got 'small'"),
    ({"type": "transformer", "qk_norm": "yes please"}, r"`qk_norm` must be bool; got 'yes please'"),
    ({"type": "transformer", "norm_type": 3}, r"`norm_type` must be str; got 3 \(int\); put it in quotes"),
    ({"type": "vlm", "transformer": {"hidden_dim": [32]}}, r"`transformer.hidden_dim` must be int"),
    ({"type": "diffusion_policy", "transformer": {}, "action_dim": "4 dims"}, r"`action_dim` must be int"),
])
def test_config_values_of_the_wrong_type_are_refused_by_key(block, message):
    with pytest.raises(ValueError, match=message):
        parse_params(block)


def test_config_values_that_fit_are_kept():
    p = parse_params({"type": "transformer", "norm_eps": "1e-5", "hidden_dim": 32, "qk_norm": True,
                      "norm_type": "rms_norm", "resume_from_checkpoint": None})
    assert p.norm_eps == pytest.approx(1e-5) and isinstance(p.norm_eps, float)
    assert (p.hidden_dim, p.qk_norm, p.norm_type, p.resume_from_checkpoint) == (32, True, "rms_norm", None)
    assert parse_params({"type": "noise_scheduler", "beta_end": 1}).beta_end == 1.0  # an int for a float field
    assert parse_params({"type": "diffusion_policy", "transformer": {}, "action_dim": None}).action_dim is None
    # as VLA Foundry's own parser (draccus) reads them: whole floats and digit strings as ints, 'true' as a bool
    p = parse_params({"type": "transformer", "n_layers": 2.0, "n_heads": "4", "qk_norm": "true"})
    assert (p.n_layers, p.n_heads, p.qk_norm) == (2, 4, True) and isinstance(p.n_layers, int)


# ---------------------------------------------------------------- 4. the training step of EMA weights

@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_ema_reports_the_step_of_its_checkpoint(tmp_path, fmt):
    """``ema_<N>`` holds ``ema_optimization_step`` (0 for vanilla EMA), not the step: that of ``checkpoint_<N>``."""
    raw, ema = tiny_model(tiny_transformer_params(), seed=1), tiny_model(tiny_transformer_params(), seed=2)
    save_experiment(raw, tmp_path, checkpoint_num=3, global_step=500, ema_state_dict=ema.state_dict(), fmt=fmt)
    if fmt == "safetensors":  # our saver also writes global_step into the EMA file's metadata: not every writer does
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        path = str(tmp_path / "checkpoints" / "ema_3.safetensors")
        with safe_open(path, "pt") as f:
            metadata = {k: v for k, v in (f.metadata() or {}).items() if k != "global_step"}
        save_file(load_file(path), path, metadata=metadata)
    loaded = load_model(tmp_path)
    assert loaded.checkpoint.ema and loaded.checkpoint.file.name == f"ema_3.{fmt}"
    assert loaded.checkpoint.step == 500 and loaded.checkpoint.checkpoint_num == 3
    assert torch.equal(logits(loaded), logits(ema))


def test_ema_without_its_checkpoint_has_no_step(tmp_path):
    raw, ema = tiny_model(tiny_transformer_params(), seed=1), tiny_model(tiny_transformer_params(), seed=2)
    save_experiment(raw, tmp_path, checkpoint_num=3, global_step=500, ema_state_dict=ema.state_dict())
    (tmp_path / "checkpoints" / "checkpoint_3.pt").unlink()
    loaded = load_model(tmp_path, checkpoint="ema_3.pt")
    assert loaded.checkpoint.ema and loaded.checkpoint.step is None


# ---------------------------------------------------------------- 5. use_diffusers_unet with a CLIP (spec §11.2)

@pytest.fixture(scope="module")
def diffusers_unet_model(policy_fixture):
    """Built once, copied by each test: the fixed 6-level diffusers UNet has 114M parameters."""
    config = {"type": "stable_diffusion", "use_diffusers_unet": True,
              "unet": {"type": "unet", "channels": [8], "image_size": 32, "text_emb_dim": 32},
              "noise_scheduler": {"num_timesteps": 10},
              "clip": {"type": "clip_hf", "hf_pretrained": str(policy_fixture / "clip_tiny")}}
    return tiny_model(parse_params(config))


def test_diffusers_unet_with_clip_is_the_reference_module(diffusers_unet_model):
    model = copy.deepcopy(diffusers_unet_model)
    keys = model.state_dict().keys()
    assert all(k.startswith(("unet.model.", "clip.model.", "scheduler.")) for k in keys)
    load_state_dict_strict(model, model.state_dict(), "checkpoint_1.pt")  # the reference's key set
    assert not model.has_text and not model.unet.takes_text
    with pytest.raises(ValueError, match="use_diffusers_unet .* takes no text .*generate without a prompt"):
        model.generate(1, prompt="a red circle")


def test_diffusers_unet_checkpoint_with_our_text_proj_still_loads_and_takes_prompts(diffusers_unet_model):
    """Checkpoints this server saved for that config before carry ``unet.text_proj.*``: they keep loading."""
    model = copy.deepcopy(diffusers_unet_model)
    g = torch.Generator().manual_seed(0)
    text_proj = {"unet.text_proj.weight": torch.randn(512, 32, generator=g), "unet.text_proj.bias": torch.randn(512)}
    load_state_dict_strict(model, {**model.state_dict(), **text_proj}, "checkpoint_1.pt")
    assert model.has_text and torch.equal(model.unet.text_proj.weight, text_proj["unet.text_proj.weight"])

    def sample(prompt):
        return model.generate(1, "cpu", prompt=prompt, generator=[torch.Generator().manual_seed(0)],
                              scheduler="ddim", num_inference_steps=1).sample

    assert not torch.equal(sample("a red circle"), sample("a blue square"))
    with pytest.raises(CheckpointError, match=r"shape mismatch .*unet.text_proj.weight"):
        load_state_dict_strict(copy.deepcopy(diffusers_unet_model),
                               {**model.state_dict(), "unet.text_proj.weight": torch.zeros(512, 7)}, "checkpoint_1.pt")


def test_an_include_cycle_is_refused_naming_it(tmp_path):

    from vla_foundry.config_files import read_yaml

    (tmp_path / "a.yaml").write_text("x: !include b.yaml\n")
    (tmp_path / "b.yaml").write_text("y: !include a.yaml\n")
    with pytest.raises(CheckpointError, match="a.yaml → b.yaml → a.yaml"):
        read_yaml(tmp_path / "a.yaml")


def test_a_state_dict_value_that_is_not_a_tensor_is_refused_naming_its_key():


    model = tiny_model(tiny_transformer_params(), seed=1)
    state = {**model.state_dict(), "norm.weight": [1.0]}
    with pytest.raises(CheckpointError, match="'norm.weight' is a list, not a tensor"):
        load_state_dict_strict(model, state, "f.pt")


def test_a_tied_pair_whose_saved_values_differ_is_refused():
    """A config that ties two weights, with a checkpoint that holds two different ones (trained untied): loading
    one over the other would serve weights the training never had."""


    model = tiny_model(tiny_transformer_params(weight_tying=True), seed=1)
    state = model.state_dict()
    tied = [name for name, p in model.named_parameters(remove_duplicate=False) if p is model.embeddings.weight]
    assert len(tied) == 2, tied  # (the model does tie them)
    state = {**state, tied[1]: torch.randn_like(state[tied[1]])}
    with pytest.raises(CheckpointError, match="weight tying"):
        load_state_dict_strict(model, state, "f.pt")
    load_state_dict_strict(model, model.state_dict(), "f.pt")  # the same value under both names loads
