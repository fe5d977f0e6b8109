"""The demo pack: one small checkpoint per servable type, trained by the project's own code.

``vla-foundry serve`` with no deployment serves it. The trained pack ships with the package
(``vla_foundry/demo/pack``: weights as safetensors, tokenizers and side files, a
``MANIFEST.json`` of checksums), so a fresh install copies it into the demo folder in
seconds; a member missing from the shipped pack is trained (minutes on CPU), and
``vla-foundry demo --rebuild`` retrains every member from the project's code and data.
Members are VLA Foundry experiment directories, so they load through exactly the code path
real checkpoints take.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

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
SHIPPED_PACK = Path(__file__).parent / "pack"  # the trained pack as the package ships it
MANIFEST = "MANIFEST.json"  # {"members": {member: {relative path: sha256}}}


def is_built(member_dir: Path) -> bool:
    return (member_dir / "config_model.yaml").is_file() and any((member_dir / "checkpoints").glob("checkpoint_*"))


def ensure_demo_pack(demo_dir: Union[str, Path], progress: bool = True, rebuild: bool = False,
                     members: Optional[Sequence[str]] = None) -> Path:
    """Make every member of the pack (or of ``members``) present under ``demo_dir``; returns ``demo_dir``.

    A missing member is copied from the shipped pack (checksums verified), else trained;
    ``rebuild`` retrains even members that exist. Each member is written in a temporary
    folder and moved into place when complete, so an interrupted build never leaves a
    half-written checkpoint to be served. Processes sharing ``demo_dir`` (replicas on one
    host, two servers) take turns on a file lock: one builds, the others then find the
    members built.
    """
    demo_dir = Path(demo_dir)
    members = list(members or BUILDERS)
    unknown = sorted(set(members) - set(BUILDERS))
    if unknown:
        raise ValueError(f"unknown demo members {unknown}; the pack holds {', '.join(DEMO_MEMBERS)}")
    if not rebuild and all(is_built(demo_dir / name) for name in members):
        return demo_dir  # nothing to do: no lock (the folder may be read-only, e.g. baked into an image)
    demo_dir.mkdir(parents=True, exist_ok=True)
    shipped = shipped_members()
    with _exclusive(demo_dir / ".build.lock"):
        for name in members:
            target = demo_dir / name
            if is_built(target) and not rebuild:
                continue
            with tempfile.TemporaryDirectory(dir=demo_dir, prefix=f".{name}-") as tmp:
                if name in shipped and not rebuild:
                    logger.info("copying the shipped demo member %s to %s", name, target)
                    copy_shipped_member(name, Path(tmp) / name, shipped[name])
                else:
                    logger.info("training demo member %s in %s", name, target)
                    BUILDERS[name](Path(tmp) / name, progress)
                if target.exists():
                    shutil.rmtree(target)
                (Path(tmp) / name).rename(target)
    return demo_dir


# ---------------------------------------------------------------------------------------------- shipped pack


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_members(pack: Optional[Path] = None) -> dict[str, dict[str, str]]:
    """Member → {relative path: sha256} of the shipped pack (empty when the package ships none)."""
    manifest = Path(pack or SHIPPED_PACK) / MANIFEST
    return json.loads(manifest.read_text())["members"] if manifest.is_file() else {}


def copy_shipped_member(name: str, target: Path, files: dict[str, str], pack: Optional[Path] = None) -> None:
    """The shipped member ``name`` copied to ``target``, every file checked against its manifest checksum."""
    pack = Path(pack or SHIPPED_PACK)
    for relative, checksum in files.items():
        source = pack / name / relative
        if not source.is_file() or _sha256(source) != checksum:
            raise RuntimeError(f"the shipped demo member {name} is damaged ({relative} is missing or differs from "
                               f"{MANIFEST}); reinstall the package, or retrain it: vla-foundry demo --rebuild")
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target / relative)


def export_pack(demo_dir: Union[str, Path], pack: Optional[Path] = None) -> Path:
    """Write the built pack in ``demo_dir`` as the package ships it: each member's files, its training
    checkpoint as safetensors (the weights and step only, no pickle), and the manifest of checksums."""
    import torch
    from safetensors.torch import save_file

    demo_dir, pack = Path(demo_dir), Path(pack or SHIPPED_PACK)
    manifest: dict[str, dict[str, str]] = {}
    for name in DEMO_MEMBERS:
        source = demo_dir / name
        if not is_built(source):
            raise FileNotFoundError(f"demo member {name} is not built in {demo_dir}; run vla-foundry demo first")
        target = pack / name
        if target.exists():
            shutil.rmtree(target)
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            relative = path.relative_to(source)
            out = target / relative
            out.parent.mkdir(parents=True, exist_ok=True)
            if relative.parts[0] == "checkpoints" and path.suffix == ".pt":
                payload = torch.load(path, map_location="cpu", weights_only=True)
                # Tied weights (an embedding shared with the output layer) are stored once per name.
                tensors = {k: v.detach().contiguous().clone() for k, v in payload["state_dict"].items()}
                metadata = {k: str(payload[k]) for k in ("checkpoint_num", "global_step") if k in payload}
                out = out.with_suffix(".safetensors")
                save_file(tensors, str(out), metadata=metadata)
            else:
                shutil.copyfile(path, out)
        manifest[name] = {str(p.relative_to(target)): _sha256(p)
                          for p in sorted(target.rglob("*")) if p.is_file()}
    (pack / MANIFEST).write_text(json.dumps({"members": manifest}, indent=1, sort_keys=True) + "\n")
    return pack


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
