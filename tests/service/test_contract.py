"""The serving contract: the service reads pipelines only through their declared interfaces, and every
transport reaches the model through ``Deployment.call``.

The check reads the service's source (``ast``): an attribute read on a pipeline (a name ``pipeline``,
or ``<anything>.pipeline``) must be a member of the interface its module serves
(``vla_foundry.pipelines.interfaces``); and each modality's pipeline class really has those members.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Protocol

import pytest

from vla_foundry.models.registry import list_registered_models, model_modality
from vla_foundry.pipelines import load_pipeline
from vla_foundry.pipelines.interfaces import INTERFACES, ActionServing, CaptionServing, Served

SERVICE = Path(__file__).resolve().parents[2] / "service"
# Which interface each module may use (the rest: only what every pipeline declares).
MODULE_INTERFACES = {
    "modalities/text.py": INTERFACES["text"], "modalities/caption.py": INTERFACES["caption"],
    "modalities/image.py": INTERFACES["image"], "modalities/encoder.py": INTERFACES["encoder"],
    "modalities/action.py": ActionServing, "routes/robot_ws.py": ActionServing, "routes/sessions.py": ActionServing,
    "routes/openai.py": CaptionServing,  # text and caption deployments
}


def members(interface: type) -> set[str]:
    """What a Protocol declares: its annotated attributes and its methods, inherited ones included."""
    names: set[str] = set()
    for cls in interface.__mro__:
        if cls in (object, Protocol) or not getattr(cls, "_is_protocol", False):
            continue
        names |= set(getattr(cls, "__annotations__", {}))
        names |= {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}
    return names


def pipeline_reads(source: str) -> list[tuple[int, str]]:
    """(line, attribute) for every attribute read on a pipeline expression in ``source``."""
    reads = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        target = node.value
        is_pipeline = ((isinstance(target, ast.Name) and target.id == "pipeline")
                       or (isinstance(target, ast.Attribute) and target.attr == "pipeline"))
        if is_pipeline:
            reads.append((node.lineno, node.attr))
    return reads


def test_the_checker_catches_a_read_past_the_interface():
    source = ("def f(deployment, pipeline):\n"
              "    return pipeline.model.checkpoint.step, deployment.pipeline.control_period_s\n")
    assert sorted(pipeline_reads(source)) == [(2, "control_period_s"), (2, "model")]
    assert not {"model", "control_period_s"} & members(ActionServing)


def test_robot_sessions_read_policies_only_through_their_interface():
    """A session takes the policy's pipeline itself (from ``routes/sessions.py`` and ``routes/robot_ws.py``): its
    reads are held to ``ActionServing`` too (it read four members the interface did not declare)."""
    session = Path(__file__).resolve().parents[2] / "vla_foundry" / "robotics" / "session.py"
    reads = pipeline_reads(session.read_text())
    assert {"anchor", "valid_until", "predict_each"} <= {attr for _, attr in reads}  # (the checker sees its reads)
    undeclared = [(line, attr) for line, attr in reads if attr not in members(ActionServing)]
    assert not undeclared, f"vla_foundry/robotics/session.py reads policy members ActionServing lacks: {undeclared}"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(SERVICE)) for p in SERVICE.rglob("*.py")))
def test_service_reads_pipelines_only_through_their_interface(path):
    allowed = members(MODULE_INTERFACES.get(path, Served))
    undeclared = [(line, attr) for line, attr in pipeline_reads((SERVICE / path).read_text()) if attr not in allowed]
    assert not undeclared, f"service/{path} reads pipeline members its interface does not declare: {undeclared}"


def test_only_deployments_talk_to_the_executor():
    """Every transport goes through ``Deployment.call``: no other module submits to a model thread."""
    offenders = []
    for path in SERVICE.rglob("*.py"):
        if path.name in ("deployments.py", "executor.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("submit", "submit_batched", "run_batched") \
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "executor":
                offenders.append(f"{path.relative_to(SERVICE)}:{node.lineno}")
    assert not offenders


@pytest.mark.parametrize("model_type", list_registered_models())
def test_every_pipeline_has_what_its_interface_declares(tiny_checkpoints, model_type):
    if model_type not in tiny_checkpoints:
        pytest.skip(f"no tiny checkpoint for {model_type}")
    pipeline = load_pipeline(tiny_checkpoints[model_type])
    interface = INTERFACES[model_modality(model_type)]
    missing = sorted(name for name in members(interface) if not hasattr(pipeline, name))
    assert not missing, f"{type(pipeline).__name__} lacks {missing} of {interface.__name__}"
