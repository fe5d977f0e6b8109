"""A loaded deployment's objects leave the garbage collector's scans; what an unloaded one leaves in cycles is still
freed; a stopped app leaves nothing frozen (service/gc_pauses.py)."""

from __future__ import annotations

import gc
import time
import weakref

import pytest

from service import DeploymentSpec
from service.gc_pauses import thaw_and_collect
from tests.service.conftest import serving

ADMIN = {"Authorization": "Bearer admin-key"}


@pytest.fixture(autouse=True)
def nothing_frozen_after():
    yield
    gc.unfreeze()  # whatever a failed assertion left frozen is not the next test's business


def scanned(obj) -> bool:
    """Whether a collection of every generation walks ``obj`` (frozen objects are in none)."""
    return any(o is obj for o in gc.get_objects())


class Node:
    """A reference cycle: freed only by a collection, never by reference counting."""

    def __init__(self):
        self.me = self


@pytest.mark.parametrize("freeze", [True, False])
def test_a_loaded_model_is_frozen_out_of_collections_until_the_app_stops(tiny_checkpoints, freeze):
    with serving(DeploymentSpec(name="lm", checkpoint=str(tiny_checkpoints["transformer"])), gc_freeze=freeze) as c:
        pipeline = c.app.state.manager.get("lm").pipeline
        assert gc.is_tracked(pipeline)
        assert scanned(pipeline) is not freeze
        assert c.post("/predict/transformer", json={"prompt": "a", "max_new_tokens": 2}).status_code == 200
    if freeze:
        assert gc.get_freeze_count() == 0  # the app's shutdown thawed what its load froze
    assert scanned(pipeline)


def test_thaw_and_collect_frees_frozen_cycles():
    node = Node()
    ref = weakref.ref(node)
    gc.freeze()
    del node
    gc.collect()
    assert ref() is not None  # frozen: an ordinary collection leaves it
    thaw_and_collect()
    assert ref() is None
    assert gc.get_freeze_count() > 0  # and the rest is frozen again


def test_an_unloaded_models_frozen_cycles_are_collected(tiny_checkpoints, tmp_path):
    with serving(DeploymentSpec(name="lm", checkpoint=str(tiny_checkpoints["transformer"])),
                 admin_keys="admin-key", checkpoint_roots=str(tmp_path)) as c:
        pipeline = c.app.state.manager.get("lm").pipeline
        node = Node()
        pipeline.__dict__["test_cycle"] = node  # reachable only through the pipeline
        ref = weakref.ref(node)
        del node, pipeline
        gc.freeze()  # as another deployment's load would
        assert c.delete("/admin/deployments/lm", headers=ADMIN).status_code == 200
        deadline = time.monotonic() + 10
        while ref() is not None and time.monotonic() < deadline:  # freed on the model thread once it is idle
            time.sleep(0.02)
        assert ref() is None
