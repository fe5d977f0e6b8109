"""A loaded deployment's objects leave the garbage collector's scans, and an unloaded one's cycles are still freed
(service/gc_pauses.py)."""

from __future__ import annotations

import gc
import time
import weakref

import pytest

from service import DeploymentSpec
from tests.service.conftest import serving

ADMIN = {"Authorization": "Bearer admin-key"}


def scanned(obj) -> bool:
    """Whether a collection of every generation walks ``obj`` (frozen objects are not in any generation)."""
    return any(o is obj for o in gc.get_objects())


@pytest.mark.parametrize("freeze", [True, False])
def test_a_loaded_model_is_frozen_out_of_collections(tiny_checkpoints, freeze):
    with serving(DeploymentSpec(name="lm", checkpoint=str(tiny_checkpoints["transformer"])), gc_freeze=freeze) as c:
        pipeline = c.app.state.manager.get("lm").pipeline
        assert gc.is_tracked(pipeline)
        assert scanned(pipeline) is not freeze
        assert c.post("/predict/transformer", json={"prompt": "a", "max_new_tokens": 2}).status_code == 200
    gc.unfreeze()  # what this test froze is not the next test's business


class Node:
    """A reference cycle: freed only by a collection, never by reference counting."""

    def __init__(self):
        self.me = self


def test_an_unloaded_models_frozen_cycles_are_collected(tiny_checkpoints, tmp_path):
    with serving(DeploymentSpec(name="lm", checkpoint=str(tiny_checkpoints["transformer"])),
                 admin_keys="admin-key", checkpoint_roots=str(tmp_path)) as c:
        pipeline = c.app.state.manager.get("lm").pipeline
        node = Node()
        pipeline.__dict__["test_cycle"] = node  # reachable only through the pipeline
        ref = weakref.ref(node)
        del node, pipeline
        gc.freeze()  # as another deployment's load would
        gc.collect()
        assert ref() is not None  # frozen: an ordinary collection leaves it
        assert c.delete("/admin/deployments/lm", headers=ADMIN).status_code == 200
        deadline = time.monotonic() + 10
        while ref() is not None and time.monotonic() < deadline:  # freed on the model thread once it is idle
            time.sleep(0.02)
        assert ref() is None
    gc.unfreeze()
