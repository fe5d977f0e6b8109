"""The demo pack: one small checkpoint per servable type, built offline by the project.

``vla-foundry serve`` with no deployment serves it, building it first when needed.
Members are written as VLA Foundry experiment directories, so they load through exactly
the code path real checkpoints take.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

from vla_foundry.demo import hf as hf_demo
from vla_foundry.demo import policy as policy_demo
from vla_foundry.demo import stable_diffusion as stable_diffusion_demo
from vla_foundry.demo import transformer as transformer_demo
from vla_foundry.demo import vlm as vlm_demo

logger = logging.getLogger(__name__)

# member name → builder(experiment_dir, progress)
BUILDERS: dict[str, Callable[[Path, bool], None]] = {
    "demo-transformer": transformer_demo.build,
    "demo-transformer_hf": hf_demo.build_transformer_hf,
    "demo-vlm": vlm_demo.build,
    "demo-vlm_hf": hf_demo.build_vlm_hf,
    "demo-stable_diffusion": stable_diffusion_demo.build,
    "demo-diffusion_policy": policy_demo.build,
}
DEMO_MEMBERS = tuple(BUILDERS)


def is_built(member_dir: Path) -> bool:
    return (member_dir / "config_model.yaml").is_file() and any((member_dir / "checkpoints").glob("checkpoint_*"))


def ensure_demo_pack(demo_dir: Union[str, Path], progress: bool = True, rebuild: bool = False) -> Path:
    """Build every missing member of the pack under ``demo_dir``; returns ``demo_dir``.

    Each member is built in a temporary folder and moved into place when complete, so an
    interrupted build never leaves a half-written checkpoint to be served. Processes sharing
    ``demo_dir`` (replicas on one host, two servers) take turns on a file lock: one builds,
    the others then find the members built.
    """
    demo_dir = Path(demo_dir)
    if not rebuild and all(is_built(demo_dir / name) for name in BUILDERS):
        return demo_dir  # nothing to build: no lock (the folder may be read-only, e.g. baked into an image)
    demo_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(demo_dir / ".build.lock"):
        for name, build in BUILDERS.items():
            target = demo_dir / name
            if is_built(target) and not rebuild:
                continue
            logger.info("building demo member %s in %s", name, target)
            with tempfile.TemporaryDirectory(dir=demo_dir, prefix=f".{name}-") as tmp:
                build(Path(tmp) / name, progress)
                if target.exists():
                    shutil.rmtree(target)
                (Path(tmp) / name).rename(target)
    return demo_dir


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_path`` across processes (flock; released when the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
