"""Shared test fixtures: the VLA Foundry conformance fixtures and tiny local checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Servers under test sample policies eagerly: capturing a traced graph per batch size at every warm-up would
# more than double the service tests' time. tests/vla_foundry/test_policy_graphs.py checks graphs == eager, and
# live-server tests serve from graphs: the fixture policy (test_action_api.py) and the VLM-conditioned ones
# (test_vlm_policy_api.py).
os.environ.setdefault("VLA_TRACED_SAMPLING", "false")

from tests.factories import build_checkpoint, build_tiny_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The conformance fixtures ship in the repository (tests/fixtures/vla_foundry/README.md says where they come
# from); VLA_FIXTURES_DIR points the tests at another copy.
FIXTURES = Path(os.environ.get("VLA_FIXTURES_DIR") or REPO / "tests" / "fixtures" / "vla_foundry")


def pytest_configure(config):
    if not FIXTURES.is_dir():
        raise pytest.UsageError(f"VLA Foundry fixtures not found at {FIXTURES}: unset VLA_FIXTURES_DIR to use the "
                                "repository's copy (tests/fixtures/vla_foundry), or point it at a fixtures directory")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def transformer_fixture() -> Path:
    return FIXTURES / "transformer_basic"


@pytest.fixture(scope="session")
def policy_fixture() -> Path:
    return FIXTURES / "diffusion_policy_clip_basic"


@pytest.fixture(scope="session")
def cases(policy_fixture) -> dict:
    """The policy fixture's ``expected/cases.json``."""
    import json

    return json.loads((policy_fixture / "expected" / "cases.json").read_text())


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """One tiny checkpoint (with a tokenizer where the type takes text) per registered type."""
    from vla_foundry.models import list_registered_models

    root = tmp_path_factory.mktemp("tiny")
    return {t: build_checkpoint(t, root / f"tiny-{t}", tokenizer=tiny_tokenizer) for t in list_registered_models()}


@pytest.fixture(autouse=True)
def _no_unexpected_server_errors(request, caplog):
    """A server bug fails the test that met it. The app answers an unexpected error itself (a 500 in the error
    shape, inside its request-id layer), so TestClient no longer raises it; its log record is what is left.
    Tests that cause such errors on purpose are marked ``server_errors``."""
    yield
    if request.node.get_closest_marker("server_errors") is not None:
        return
    unexpected = [r for r in caplog.get_records("call") if r.getMessage().startswith("unhandled error on ")]
    assert not unexpected, "the server met an unexpected error:\n" + "\n".join(
        caplog.handler.format(r) for r in unexpected)
