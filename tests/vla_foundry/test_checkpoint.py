import pickle
import shutil

import pytest
import torch
import yaml

from vla_foundry import load_model, save_experiment
from vla_foundry.checkpoint import find_checkpoint, natural_sort_key, strip_wrapper_prefixes
from vla_foundry.errors import CheckpointError
from tests.factories import tiny_model, tiny_transformer_params

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


@pytest.fixture
def experiment(tmp_path):
    model = tiny_model(tiny_transformer_params())
    save_experiment(model, tmp_path / "exp")
    return tmp_path / "exp", model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_round_trip_is_exact_and_eval_mode(experiment):
    path, model = experiment
    loaded = load_model(path)
    assert not loaded.training
    assert loaded.params.to_dict() == model.params.to_dict()
    assert loaded.checkpoint.file.name == "checkpoint_1.pt" and loaded.checkpoint.checkpoint_num == 1
    assert torch.equal(logits(loaded), logits(model))


def test_natural_sort_picks_checkpoint_11_over_9(tmp_path):
    model = tiny_model(tiny_transformer_params())
    for n in (9, 10, 11):
        save_experiment(tiny_model(tiny_transformer_params(), seed=n), tmp_path, checkpoint_num=n)
    names = ["checkpoint_9.pt", "checkpoint_11.pt", "checkpoint_10.pt"]
    assert sorted(names, key=natural_sort_key)[-1] == "checkpoint_11.pt"
    file, ema = find_checkpoint(tmp_path)
    assert file.name == "checkpoint_11.pt" and not ema
    assert load_model(tmp_path).checkpoint.checkpoint_num == 11
    assert load_model(tmp_path, checkpoint="checkpoint_9.pt").checkpoint.checkpoint_num == 9
    assert load_model(tmp_path, checkpoint=10).checkpoint.checkpoint_num == 10
    del model


def test_a_named_checkpoint_file_is_the_experiments_even_where_the_server_runs_beside_one_of_that_name(
        tmp_path, monkeypatch):
    """``checkpoint="checkpoint_1.pt"`` names the file in <experiment>/checkpoints/: another run's file of that
    name in the working directory is not loaded instead (it was, silently). A relative path to a file elsewhere
    still loads where checkpoints/ has none of that name."""
    save_experiment(tiny_model(tiny_transformer_params(), seed=1), tmp_path / "exp")
    save_experiment(tiny_model(tiny_transformer_params(), seed=2), tmp_path / "other")
    monkeypatch.chdir(tmp_path / "other" / "checkpoints")  # holds its own checkpoint_1.pt
    loaded = load_model(tmp_path / "exp", checkpoint="checkpoint_1.pt")
    assert loaded.checkpoint.file.resolve() == (tmp_path / "exp" / "checkpoints" / "checkpoint_1.pt").resolve()
    assert torch.equal(logits(loaded), logits(tiny_model(tiny_transformer_params(), seed=1)))
    monkeypatch.chdir(tmp_path)
    elsewhere = load_model(tmp_path / "exp", checkpoint="other/checkpoints/checkpoint_1.pt")
    assert torch.equal(logits(elsewhere), logits(tiny_model(tiny_transformer_params(), seed=2)))


def test_ema_is_used_when_enabled_and_overridable(tmp_path):
    raw, ema = tiny_model(tiny_transformer_params(), seed=1), tiny_model(tiny_transformer_params(), seed=2)
    save_experiment(raw, tmp_path, checkpoint_num=3, ema_state_dict=ema.state_dict())
    loaded = load_model(tmp_path)
    assert loaded.checkpoint.ema and loaded.checkpoint.file.name == "ema_3.pt"
    assert torch.equal(logits(loaded), logits(ema))
    assert torch.equal(logits(load_model(tmp_path, use_ema=False)), logits(raw))
    (tmp_path / "checkpoints" / "ema_3.pt").unlink()
    with pytest.raises(CheckpointError, match="EMA enabled but ema_3.pt is missing.*use_ema=False"):
        load_model(tmp_path)


def test_wrapper_prefixes_are_stripped(experiment):
    path, model = experiment
    file = path / "checkpoints" / "checkpoint_1.pt"
    payload = torch.load(file, weights_only=True)
    payload["state_dict"] = {f"_orig_mod.module.{k}": v for k, v in payload["state_dict"].items()}
    torch.save(payload, file)
    assert torch.equal(logits(load_model(path)), logits(model))
    assert strip_wrapper_prefixes({"module._orig_mod.a": 1, "b": 2}) == {"a": 1, "b": 2}


def test_bf16_weights_are_upcast_exactly(experiment):
    path, model = experiment
    file = path / "checkpoints" / "checkpoint_1.pt"
    payload = torch.load(file, weights_only=True)
    payload["state_dict"] = {k: v.to(torch.bfloat16) for k, v in payload["state_dict"].items()}
    torch.save(payload, file)
    loaded = load_model(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    rounded = tiny_model(tiny_transformer_params())
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    assert torch.equal(logits(loaded), logits(rounded))


def test_load_to_dtype(experiment):
    path, model = experiment
    loaded = load_model(path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.allclose(logits(loaded).float(), logits(model), atol=0.1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(path, dtype="float8")


def test_auto_dtype_is_float32_on_cpu_even_for_a_bf16_run(tmp_path):
    """``dtype="auto"`` picks as the server does: bfloat16 only on CUDA (tests/test_gpu.py), float32 on the CPU."""
    path = tmp_path / "bf16-run"
    save_experiment(tiny_model(tiny_transformer_params()), path, precision="amp_bf16")
    loaded = load_model(path, dtype="auto")
    assert loaded.checkpoint.precision == "amp_bf16"
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


class Exploit:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_pickle_payloads_are_refused_and_never_run(experiment, tmp_path):
    path, _ = experiment
    file = path / "checkpoints" / "checkpoint_1.pt"
    marker = tmp_path / "exploited"
    payload = torch.load(file, weights_only=True)
    payload["optimizer_factory"] = pickle.Pickler  # a class reference
    torch.save(payload, file)
    with pytest.raises(CheckpointError, match="refusing to load .*pickled Python objects") as err:
        load_model(path)
    assert "weights_only=False" not in str(err.value)
    payload["optimizer_factory"] = Exploit(marker)  # a call to os.system inside a torch zip
    torch.save(payload, file)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(path)
    with open(file, "wb") as f:  # a raw pickle, not a torch zip at all
        pickle.dump({"state_dict": {}, "x": Exploit(marker)}, f)
    with pytest.raises(CheckpointError, match="not a torch zip checkpoint.*nothing else is unpickled"):
        load_model(path)
    assert not marker.exists()


def test_garbage_file_is_a_clear_error(experiment):
    path, _ = experiment
    (path / "checkpoints" / "checkpoint_1.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch zip checkpoint"):
        load_model(path)


def test_safetensors_checkpoint(tmp_path):
    model = tiny_model(tiny_transformer_params(weight_tying=True))
    save_experiment(model, tmp_path, checkpoint_num=4, global_step=40, fmt="safetensors")
    loaded = load_model(tmp_path)
    assert loaded.checkpoint.file.name == "checkpoint_4.safetensors" and loaded.checkpoint.step == 40
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.output.weight is loaded.embeddings.weight


def test_strict_load_lists_missing_and_unexpected_keys(experiment):
    path, _ = experiment
    file = path / "checkpoints" / "checkpoint_1.pt"
    payload = torch.load(file, weights_only=True)
    payload["state_dict"]["extra.weight"] = torch.zeros(1)
    del payload["state_dict"]["norm.weight"]
    torch.save(payload, file)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert "missing (1): norm.weight" in str(err.value) and "unexpected (1): extra.weight" in str(err.value)


def test_shape_mismatch_is_named(experiment):
    path, _ = experiment
    config = yaml.safe_load((path / "config_model.yaml").read_text())
    config["vocab_size"] = 301
    (path / "config_model.yaml").write_text(yaml.safe_dump(config))
    mismatch = r"shape mismatch .*embeddings.weight: checkpoint \(300, 32\) vs model \(301, 32\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_model(path)


def test_config_yaml_model_block_is_the_fallback(experiment):
    path, model = experiment
    (path / "config_model.yaml").unlink()
    assert torch.equal(logits(load_model(path)), logits(model))
    (path / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="no model config"):
        load_model(path)


def test_missing_checkpoints_are_clear(tmp_path, experiment):
    path, _ = experiment
    shutil.rmtree(path / "checkpoints")
    with pytest.raises(CheckpointError, match="no checkpoint_<N>.pt"):
        load_model(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_fixture_strict_load(transformer_fixture):
    model = load_model(transformer_fixture)
    assert model.checkpoint.file.name == "checkpoint_2.pt"  # latest by natural sort
    assert set(model.state_dict()) == set(torch.load(model.checkpoint.file, weights_only=True)["state_dict"])
