import pytest

from vla_foundry.models import registry
from vla_foundry.models.registry import (
    create_batch_handler,
    create_model,
    is_model_registered,
    list_registered_batch_handlers,
    list_registered_models,
    register_batch_handler,
    register_model,
)
from tests.factories import tiny_transformer_params


@pytest.fixture
def scratch_registry(monkeypatch):
    """Register test-only keys without leaking them into other tests."""
    monkeypatch.setattr(registry.MODELS, "_table", dict(registry.MODELS._table))
    monkeypatch.setattr(registry.BATCH_HANDLERS, "_table", dict(registry.BATCH_HANDLERS._table))


def test_transformer_is_registered_with_its_batch_handler():
    assert "transformer" in list_registered_models()
    assert "transformer" in list_registered_batch_handlers()
    assert is_model_registered("transformer")
    assert not is_model_registered("no_such_type")
    assert list_registered_models() == sorted(list_registered_models())


def test_register_and_create(scratch_registry):
    @register_model("toy")
    class Toy:
        modality = "text"

        def __init__(self, params, load_pretrained=True):
            self.params, self.load_pretrained = params, load_pretrained

    class P:
        type = "toy"

    model = create_model(P(), load_pretrained=False)
    assert isinstance(model, Toy) and model.load_pretrained is False
    assert "toy" in list_registered_models()


def test_duplicate_model_key_raises(scratch_registry):
    with pytest.raises(ValueError, match="already registered"):
        @register_model("transformer")
        class Again:
            pass


def test_duplicate_batch_handler_key_raises(scratch_registry):
    with pytest.raises(ValueError, match="already registered"):
        @register_batch_handler("transformer")
        class Again:
            pass


def test_unknown_model_key_names_closest_and_all():
    params = tiny_transformer_params()
    params.type = "transfomer"
    with pytest.raises(ValueError) as err:
        create_model(params)
    message = str(err.value)
    assert "'transfomer'" in message and "closest is 'transformer'" in message
    for key in list_registered_models():
        assert key in message


def test_unknown_batch_handler_key():
    with pytest.raises(ValueError, match="unknown batch handler 'nope'.*Registered: .*transformer"):
        create_batch_handler("nope")


def test_create_model_builds_the_registered_class():
    model = create_model(tiny_transformer_params(), load_pretrained=False)
    assert type(model).__name__ == "Transformer"
    assert model.params.hidden_dim == 32


def test_model_package_imports_without_service():
    import subprocess
    import sys

    code = ("import sys, vla_foundry, vla_foundry.models, vla_foundry.pipelines, vla_foundry.demo; "
            "assert not any(m == 'service' or m.startswith('service.') for m in sys.modules), 'service imported'")
    subprocess.run([sys.executable, "-c", code], check=True)

