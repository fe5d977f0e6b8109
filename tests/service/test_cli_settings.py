import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.settings import DeploymentSpec, Settings, parse_checkpoint_arg


def test_models_command_lists_types():
    out = subprocess.run([sys.executable, "-m", "service", "models"], capture_output=True, text=True, check=True)
    assert "transformer" in out.stdout and "text" in out.stdout and "batch handlers" in out.stdout


def test_the_command_line_needs_the_web_stack_only_to_serve():
    """``vla-foundry models`` (and ``demo``) import neither FastAPI nor uvicorn: the serve extra is optional."""
    code = ("import sys; import service.cli as cli; code = cli.main(['models']); "
            "assert not any(m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette') for m in sys.modules), "
            "'the web stack was imported'; sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "diffusion_policy" in out.stdout


def test_deployment_yaml_env_and_overrides(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"device": "cpu", "dtype": "float32", "deployments": [
        {"name": "lm", "checkpoint": "ckpt", "dtype": "bfloat16", "tokenizer": "/tok"}]}))
    monkeypatch.setenv("VLA_MAX_QUEUE", "7")
    monkeypatch.setenv("VLA_DEVICE", "cuda")
    settings = Settings.load(config, port=9001, deployments=[parse_checkpoint_arg(f"{tmp_path}/other=second")])
    assert settings.max_queue == 7 and settings.port == 9001
    assert settings.device == "cpu", "the deployment file beats the environment"
    assert [d.resolved_name for d in settings.deployments] == ["lm", "second"]
    assert settings.deployments[0].checkpoint == str((tmp_path / "ckpt").resolve()), "relative to the file"
    assert settings.deployments[0].dtype == "bfloat16"


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="device must be"):
        Settings(device="tpu")
    with pytest.raises(ValueError, match=r"device must be auto, cpu, cuda or cuda:N .*got 'cuda:abc'"):
        Settings(device="cuda:abc")  # (it used to pass here and fail later without naming the setting)
    with pytest.raises(ValueError, match=r"deployments\[\]\.device must be .*got 'cuda:-1'"):
        Settings(deployments=[{"checkpoint": "x", "device": "cuda:-1"}])
    assert Settings(device="cuda:1", deployments=[{"checkpoint": "x", "device": "cpu"}]).device == "cuda:1"
    with pytest.raises(ValueError, match="does not exist"):
        Settings.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"deployments": [{"checkpoint": "x", "chekpoint_file": "y"}]}))
    with pytest.raises(ValueError, match="chekpoint_file"):
        Settings.load(tmp_path / "bad.yaml")


def test_duplicate_deployment_names_are_refused(tmp_path):
    from service import DeploymentSpec, create_app

    spec = DeploymentSpec(checkpoint=str(tmp_path / "same"))
    with pytest.raises(ValueError, match="unique; repeated: same"):
        create_app(Settings(deployments=[spec, spec]))


def test_deployments_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VLA_DEPLOYMENTS", f'[{{"name": "env-lm", "checkpoint": "{tmp_path}"}}]')
    assert [d.name for d in Settings.load().deployments] == ["env-lm"]
    cli = Settings.load(deployments=[parse_checkpoint_arg(f"{tmp_path}=cli-lm")])
    assert [d.name for d in cli.deployments] == ["cli-lm"], "CLI flags beat the environment"


def test_switch_interval_is_applied_at_startup_and_defaults_to_pythons(tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app

    missing = [DeploymentSpec(checkpoint=str(tmp_path / "none"))]  # fails to load at once: nothing to build
    before = sys.getswitchinterval()
    try:
        with TestClient(create_app(Settings(deployments=missing))):
            assert sys.getswitchinterval() == before  # not set: Python's own
        with TestClient(create_app(Settings(deployments=missing, switch_interval_ms=0.5))):
            assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)


def test_setting_errors_never_echo_the_api_keys(monkeypatch):
    """A refused start prints its reason; the keys it was given are not part of it (they would land in logs)."""
    monkeypatch.setenv("VLA_API_KEYS", "supersecret-robot-key")
    with pytest.raises(ValueError) as refused:
        Settings.load(gpus="0")  # refused: gpus without replicas
    assert "gpus" in str(refused.value) and "supersecret" not in str(refused.value)
    with pytest.raises(ValueError) as refused:
        Settings(api_keys="good-key,bad key")
    assert "bad key" not in str(refused.value)


def test_a_session_store_url_that_redis_cannot_read_is_refused_without_echoing_its_password():
    """(redis-py's own message quotes the part it could not read: with a / in the password, the password.)"""
    with pytest.raises(ValueError) as refused:
        Settings(session_store="redis://:hunter2/x@redis:6379/0")
    assert "session_store is not a URL that Redis can read" in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_redis_urls_in_messages_hide_their_password():
    from service.shared_sessions import redacted_url

    assert redacted_url("redis://:hunter2@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redacted_url("rediss://user:pw@host/1") == "rediss://user:***@host/1"
    assert redacted_url("redis://host:6379/0") == "redis://host:6379/0"


@pytest.mark.parametrize("values, message", [
    ({"log_level": "verbose"}, "log_level"),
    ({"session_store": "notaurl"}, "session_store must be a Redis URL"),
    ({"session_store": "redis://h:notaport/0"}, "session_store is not a URL that Redis can read"),
    ({"session_store": "redis://h:99999/0"}, "session_store is not a URL that Redis can read"),
    ({"session_store": "redis://h:6379/0?socket_timeout=abc"}, "session_store is not a URL that Redis can read"),
    ({"kv_cache_mb": float("inf")}, "kv_cache_mb"),
    ({"replicas_per_gpu": 3}, "replicas_per_gpu .3. counts replicas on each GPU"),
    ({"deployments": [{"checkpoint": "/a", "control_period_s": float("inf")}]}, "control_period_s"),
    ({"deployments": [{"checkpoint": "/a", "name": "x"}, {"checkpoint": "/b", "name": "x"}]},
     "deployment names must be unique; repeated: x"),
    ({"dtype": "float33"}, r"dtype must be auto, float32, bfloat16 or float16; got 'float33'"),
    ({"deployments": [{"checkpoint": "/a", "dtype": "half"}]},
     r"deployments\[\]\.dtype must be auto, float32, bfloat16 or float16; got 'half'"),
])
def test_settings_that_would_fail_later_are_refused_at_start(values, message):
    """Refused while the settings load (exit 2, and a launcher does not restart it), not as a traceback later."""
    with pytest.raises(ValueError, match=message):
        Settings(**values)


def test_empty_variables_are_unset(monkeypatch):
    monkeypatch.setenv("VLA_DEMO_DIR", "")
    monkeypatch.setenv("VLA_GPUS", "")
    monkeypatch.setenv("VLA_CONFIG", "")
    settings = Settings.load()
    assert settings.demo_dir == Settings.model_fields["demo_dir"].default and settings.gpus is None


def test_a_checkpoint_path_with_an_equals_sign(tmp_path):
    path = tmp_path / "a=b" / "ckpt"
    path.mkdir(parents=True)
    assert parse_checkpoint_arg(str(path)).checkpoint == str(path.resolve())
    named = parse_checkpoint_arg(f"{path}=mine")
    assert (named.checkpoint, named.name) == (str(path.resolve()), "mine")


def test_a_deployment_file_that_is_not_yaml_is_named(tmp_path):
    bad = tmp_path / "deploy.yaml"
    bad.write_text("deployments:\n\t- checkpoint: x\n")
    with pytest.raises(ValueError, match=f"deployment file {bad} is not valid YAML"):
        Settings.load(bad)


def test_misspelt_variables_are_warned_about(monkeypatch):
    from service.settings import ignored_variables

    environ = {"VLA_MAX_QUEU": "3", "VLA_DEPLOY_FILE": "/x", "VLA_PORT": "1", "VLA_SOMETHING_ELSE": "1"}
    warnings = ignored_variables(environ, Settings())
    assert warnings == ["VLA_MAX_QUEU is not a setting of this server and is ignored; did you mean VLA_MAX_QUEUE?",
                        "VLA_SOMETHING_ELSE is not a setting of this server and is ignored"]
    open_server = ignored_variables({"VLA_API_KEY": "robot-secret"}, Settings())
    assert len(open_server) == 1 and "serves without authentication" in open_server[0]
    assert ignored_variables({"VLA_API_KEY": "robot-secret"}, Settings(api_keys="k")) == []


def test_review_cases_of_the_start_checks(tmp_path, monkeypatch):
    """A YAML error names the place, not the line's text (it may hold keys); upper-case log levels, as VLA Foundry's
    configs write them, and upper-case URL schemes are taken; a name may hold '='; settings read case-blind are
    not reported as ignored."""
    from service.settings import ignored_variables
    from service.shared_sessions import redacted_url

    bad = tmp_path / "keys.yaml"
    bad.write_text("api_keys: sk-SECRET-123: oops\n")
    with pytest.raises(ValueError) as refused:
        Settings.load(bad)
    assert "line 1" in str(refused.value) and "SECRET" not in str(refused.value)
    assert Settings(log_level="INFO").log_level == "info"
    assert Settings(session_store="REDIS://:pw@h:6379/0").session_store
    assert redacted_url("redis://h:6379/0?password=pw&db=1") == "redis://h:6379/0?password=***&db=1"
    real = tmp_path / "real"
    real.mkdir()
    spec = parse_checkpoint_arg(f"{real}=lr=3e-4")
    assert (spec.checkpoint, spec.name) == (str(real.resolve()), "lr=3e-4")
    monkeypatch.setenv("VLA_Max_Queue", "7")
    assert Settings().max_queue == 7 and ignored_variables({"VLA_Max_Queue": "7"}, Settings()) == []
    assert ignored_variables({"VLA_BENCH_SIMULATED_GPU": "1"}, Settings()) == []  # (bench/fleet.py --simulated-gpu)
    commented = tmp_path / "commented.yaml"  # deploy.yaml.example with its entries commented out
    commented.write_text("device: auto\ndeployments:\n#  - name: my-lm\n#    checkpoint: /checkpoints/lm\n")
    assert Settings.load(commented).deployments == Settings().deployments


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["demo", "--help"], ["models", "--help"]])
def test_help_is_plain_text(argv, capsys):
    """The help comes from docstrings; their reStructuredText markup is not shown."""
    from service.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    shown = capsys.readouterr().out
    assert exited.value.code == 0 and shown.startswith("usage: vla-foundry")
    assert "``" not in shown and not re.search(r":\w+:`", shown), shown
    if argv == ["--help"]:
        assert "vla-foundry (also python -m service): serve" in shown


@pytest.mark.parametrize("where", ["a-file", "a-file/pack"])
def test_demo_dir_that_cannot_be_a_directory_is_one_line_not_a_traceback(tmp_path, where):
    (tmp_path / "a-file").write_text("not a directory")
    target = tmp_path / where
    out = subprocess.run([sys.executable, "-m", "service", "demo", "--dir", str(target)], capture_output=True,
                         text=True)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"vla-foundry demo: --dir {target} ") and "is a file, not a directory" in out.stderr
    if where != "a-file":
        assert f"cannot be made: {tmp_path / 'a-file'} is a file" in out.stderr


def test_a_deployment_dtype_that_is_no_dtype_is_refused_at_start_with_exit_2(tmp_path):
    """It used to start, and mark the deployment failed once it tried to load."""
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"device": "cpu", "deployments": [{"checkpoint": str(tmp_path),
                                                                        "dtype": "float33"}]}))
    out = subprocess.run([sys.executable, "-m", "service", "serve", "--config", str(config), "--port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "deployments[].dtype must be auto, float32, bfloat16 or float16; got 'float33'" in out.stderr


@pytest.mark.parametrize("gpus, devices", [(0, ["auto", "cpu"]), (2, ["auto", "cpu", "cuda", "cuda:0", "cuda:1"])])
def test_devices_the_host_has_pass_the_start_check(monkeypatch, gpus, devices):
    import torch

    from service import DeploymentSpec
    from service.replicas import check_devices_exist, settings_for_replica

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for device in devices:
        check_devices_exist(Settings(device=device))
        check_devices_exist(Settings(device="cpu", deployments=[DeploymentSpec(checkpoint="/x", device=device)]))
    if gpus:  # a replica given one GPU sees it as cuda:0
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        check_devices_exist(settings_for_replica(Settings(device="cuda:0"), 1, "--gpus"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device this process sees \\(CUDA_VISIBLE_DEVICES=''\\)"):
        check_devices_exist(Settings(device="cuda"))


@pytest.mark.parametrize("gpus, shown", [(0, "this host has no CUDA device, only the cpu; use cpu or auto"),
                                         (2, "this host's devices are cpu and cuda:0..cuda:1; use one of them")])
@pytest.mark.parametrize("how", ["flag", "variable", "deployment"])
def test_a_device_the_host_lacks_is_refused_at_start_naming_the_devices_there_are(tmp_path, monkeypatch, capsys,
                                                                                   gpus, shown, how):
    """It used to start, mark every deployment on it failed, and stay unready (503) for good."""
    import torch

    from service.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    argv = ["serve", "--port", "0", "--checkpoint", str(tmp_path)]
    where = "device"
    if how == "flag":
        argv += ["--device", "cuda:3"]
    elif how == "variable":
        monkeypatch.setenv("VLA_DEVICE", "cuda:3")
    else:
        config = tmp_path / "deploy.yaml"
        config.write_text(yaml.safe_dump({"device": "cpu", "deployments": [{"name": "arm", "checkpoint": ".",
                                                                            "device": "cuda:3"}]}))
        argv = ["serve", "--port", "0", "--config", str(config)]
        where = "deployment 'arm' device"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vla-foundry serve: {where} is 'cuda:3', but {shown}") and err.count("\n") == 1, err


@pytest.mark.parametrize("case", ["checkpoint not text", "typos", "deployments a mapping", "port", "demo-dir a file",
                                  "no name", "config a directory", "origin wildcard", "port in the file"])
def test_an_operators_mistakes_are_one_line_each_naming_the_setting(tmp_path, case):
    """What a live operator's probe found: a traceback, pydantic's dumps, and mistakes that started anyway."""
    config = tmp_path / "deploy.yaml"
    (tmp_path / "a-file").write_text("x")
    bodies = {"checkpoint not text": {"deployments": [{"checkpoint": 5}]},
              "typos": {"devce": "cpu", "deployments": [{"checkpoint": str(tmp_path), "chekpoint_file": "x"}]},
              "deployments a mapping": {"deployments": {"name": "a", "checkpoint": str(tmp_path)}},
              "port in the file": {"port": 80800}}  # (named where it was set, not as a variable never set)
    if case in bodies:
        config.write_text(yaml.safe_dump(bodies[case]))
    args, env = {"port": ["--port", "70000"], "demo-dir a file": ["--demo-dir", str(tmp_path / "a-file")],
                 "no name": ["--checkpoint", "/"], "config a directory": ["--config", str(tmp_path)],
                 "origin wildcard": []}.get(case, ["--config", str(config)]), dict(os.environ)
    if case == "origin wildcard":
        env["VLA_ALLOWED_ORIGINS"] = "https://*.example.com"
    out = subprocess.run([sys.executable, "-m", "service", "serve", *args], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "errors.pydantic.dev" not in out.stderr, \
        out.stderr
    expected = {"checkpoint not text": "deployments[0].checkpoint must be a path",
                "typos": "did you mean 'checkpoint_file'?", "deployments a mapping": "`deployments` must be a list",
                "port": "port (VLA_PORT): Input should be less than or equal to 65535",
                "demo-dir a file": "is a file, not a directory", "no name": "gives no usable deployment name",
                "config a directory": "is a directory; name the YAML file", "origin wildcard": "no wildcard",
                "port in the file": f"port (in {config}): Input should be less than or equal to 65535"}[case]
    assert expected in out.stderr, out.stderr
    if case == "typos":
        assert "devce: unknown setting; did you mean 'device'?" in out.stderr


def test_the_readmes_deployment_files_load_as_settings(tmp_path):
    """Every YAML block of the README that declares `deployments:` loads as the server's settings (an unknown key
    or a value of the wrong type is refused), so the examples a reader copies are ones the server takes."""
    readme = Path(__file__).resolve().parents[2] / "README.md"
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", readme.read_text(), flags=re.S) if "deployments:" in b]
    assert len(blocks) >= 2, "the README's deployment examples were not found"
    for i, block in enumerate(blocks):
        path = tmp_path / f"deploy{i}.yaml"
        path.write_text(block)
        settings = Settings.load(path)
        assert settings.deployments and all(d.checkpoint for d in settings.deployments), block
