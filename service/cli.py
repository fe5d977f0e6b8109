"""``vla-foundry`` (also ``python -m service``): serve, build the demo pack, list types.

It lives beside the server it starts, so the model package never imports the service.
``serve`` is the one command that needs the ``serve`` extra (FastAPI, uvicorn): those are
imported only there, so ``demo`` and ``models`` work with the model package alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

if TYPE_CHECKING:
    from service.replicas import Replica

# uvicorn's websocket implementation: the one it recommends (its older ``websockets`` one warns at every start that
# it is deprecated). From uvicorn 0.52.1 (pyproject's floor) its closing handshake waits for the robot's reply to a
# close (1001 at a drain) instead of resetting the connection. Its settings: ws_max_size (1009 past it), no
# per-message compression, uvicorn's default pings.
WEBSOCKETS = "websockets-sansio"


def _serve(args: argparse.Namespace) -> int:
    if args.listen_fd is not None:  # a replica of `serve --replicas`: before anything else, tie it to its launcher
        from service.launcher import die_with_the_launcher

        if not die_with_the_launcher(args.launcher_pid):
            return 0  # the launcher is gone already: nobody to serve for
    try:
        import uvicorn

        from service.app import create_app
        from service.deployments import LOADING
        from service.launcher import CONFIG_ERROR, PLAN_FLAGS
        from service.replicas import check_devices_exist, hold_startup_until_loaded, settings_for_replica
        from service.read_timeouts import read_timeout_protocol
        from service.request_ids import configure_logging
        from service.settings import Settings, parse_checkpoint_arg
    except ImportError as e:
        print(f"vla-foundry serve needs the serving extra: pip install 'vla-foundry-serve[serve]' ({e})",
              file=sys.stderr)
        return 2
    try:
        settings = Settings.load(
            args.config, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
            demo_dir=args.demo_dir, deployments=[parse_checkpoint_arg(c) for c in args.checkpoint or []] or None,
            replicas=args.replicas, replicas_per_gpu=args.replicas_per_gpu, gpus=args.gpus)
        replica = _replica_of_launch(args, settings)
        if replica is not None:
            settings = settings_for_replica(settings, replica.num_gpus, PLAN_FLAGS)
        if replica is not None or settings.replicas == 1:  # (a launcher checks its replicas' devices in _launch)
            check_devices_exist(settings)
        if not settings.deployments:  # the demo pack is made there
            refusal = _demo_dir_refusal(Path(settings.demo_dir), "--demo-dir (VLA_DEMO_DIR)")
            if refusal is not None:
                raise ValueError(refusal)
    except ValueError as e:
        print(f"vla-foundry serve: {settings_error(e, args.config)}", file=sys.stderr)
        return CONFIG_ERROR
    configure_logging(settings.log_format)
    if replica is None and settings.replicas != 1:  # this process launches the replicas and watches them
        return _launch(args, settings)
    if replica is None:  # what concerns a whole launch is said once, by its launcher, not by each of its replicas
        _warn_about_the_settings(settings, dict(os.environ))
    # uvicorn drains on SIGTERM and Ctrl-C, then raises the signal again for the handler it found: exit 0 there,
    # the drain is done (the default handlers would end the process "killed by SIGTERM", or with a
    # KeyboardInterrupt traceback).
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: sys.exit(0))
    server = manager = None
    try:
        app = create_app(settings, replica and replica.replica)
        manager = app.state.manager
        # One banner for a launch of replicas: its first replica's, once it listens (after its models have loaded).
        announce = (lambda port: _announce(settings, port)) if replica is None or replica.replica.index == 0 else None
        server_class = _draining_server(uvicorn, app, settings.drain_timeout_s, announce, settings.log_format)
        if replica is not None:  # behind the launcher's socket: no connection taken until every model has loaded
            hold_startup_until_loaded(app, stopping=lambda: server_class.stop_requested)
        http = read_timeout_protocol(settings.header_timeout_s, settings.body_timeout_s,
                                     on_timeout=app.state.metrics.count_read_timeout)
        # Websocket frames: no per-message compression (it costs milliseconds per camera frame), and uvicorn closes
        # a connection whose frame exceeds the cap with 1009.
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level, http=http,
                                access_log=False, ws=WEBSOCKETS, ws_per_message_deflate=False,
                                timeout_graceful_shutdown=settings.drain_timeout_s,
                                ws_max_size=settings.max_ws_frame_bytes,
                                # uvicorn's own lines go through the root handler too, in the server's format (text
                                # with a time and the request id, or one JSON object per line)
                                log_config=None)
        sockets = None
        if args.listen_fd is not None:  # the launcher's socket; not passed on to anything this process starts
            sockets = [socket.socket(fileno=args.listen_fd)]
            sockets[0].set_inheritable(False)
        server = server_class(config)
        server.run(sockets=sockets)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    if any(t.name.startswith("model-") and t.is_alive() for t in threading.enumerate()):
        # A model call or a load outlived the drain: it cannot be interrupted, and finalizing the interpreter under
        # it aborts the process (a C++ terminate), so leave at once.
        deployments = [] if manager is None else list(manager.deployments.values())
        loading = [d.name for d in deployments if d.status == LOADING]
        loading += [] if manager is None else [f"the reload of {name}" for name in manager.reloads_left_loading]
        calling = [d.name for d in deployments if d.status != LOADING and d.executor.at_work(0.0)]
        level, message = _leaving_with_model_threads(server is not None and server.started, loading, calling)
        logging.getLogger("service").log(level, message)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _launch(args: argparse.Namespace, settings) -> int:
    """``serve --replicas``: what makes the launch impossible (its GPUs, its devices, its address) is refused first,
    alone; then the launch's warnings, the demo pack, the banner, and the launcher (service/launcher.py)."""
    from service.launcher import CONFIG_ERROR, launch, launch_banner, prepare_launch

    try:
        plan, sock = prepare_launch(settings)
    except ValueError as e:
        _say_error(settings.log_format, settings_error(e))
        return CONFIG_ERROR
    _warn_about_the_settings(settings, dict(os.environ))
    if settings.session_store is None:
        logging.getLogger("service").warning(
            "several replicas without VLA_SESSION_STORE: a robot session on HTTP lives in the replica that made "
            "it, and a robot whose connection lands on another replica starts a new one; use the robot "
            "websocket, or set VLA_SESSION_STORE to a Redis")
    if not settings.deployments:
        from vla_foundry.demo import ensure_demo_pack

        ensure_demo_pack(settings.demo_dir, progress=True)  # once, before the replicas would race to build it
    _say(settings.log_format, launch_banner(plan, settings.host, sock.getsockname()[1]))
    return launch([*serve_command(), *args.argv], plan, sock, settings.drain_timeout_s, settings.torch_threads)


def _warn_about_the_settings(settings, environ: dict[str, str]) -> None:
    """Variables that nothing reads; a launch of replicas open to the network without keys (a server on its own:
    its app says it)."""
    from service.app import unprotected_warning
    from service.settings import ignored_variables

    warnings = ignored_variables(environ, settings)
    if settings.replicas != 1 and unprotected_warning(settings):
        warnings.append(unprotected_warning(settings))
    for warning in warnings:
        logging.getLogger("service").warning(warning)


def _say(log_format: str, text: str, level: int = logging.INFO, message: Optional[str] = None, **extra) -> None:
    """What the start tells its operator, in the format of every other line: with JSON logs one object (``message``
    or the text itself, with ``extra`` fields), else the text on stderr."""
    if log_format == "json":
        logging.getLogger("service").log(level, message or text, extra=extra or None)
    else:
        print(text, file=sys.stderr, flush=True)


def _say_error(log_format: str, message: str) -> None:
    """Why the start failed, once logging is set: one line."""
    _say(log_format, f"vla-foundry serve: {message}", logging.ERROR)


def base_url(host: str, port: int) -> str:
    """Where a browser on this host reaches a server bound to ``host``: the loopback address of its family for
    every interface (``0.0.0.0`` is IPv4 only, ``::`` IPv6 only, as uvicorn and the launcher bind them)."""
    from service.launcher import address

    return "http://" + address({"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port)


def banner_lines(settings, port: int) -> list[str]:
    url = base_url(settings.host, port)
    # With keys, the lines send one from $VLA_API_KEY (a key is never printed)
    key = ' -H "Authorization: Bearer $VLA_API_KEY"' if settings.api_key_list() else ""
    lines = [f"VLA Foundry Serve on {url}/ (a page to try every model; the API reference at {url}/docs)",
             f"  curl {url}/models{key}"]
    if not settings.deployments:  # each member is made ready on its deployment's thread; a server on its own
        # listens at once (a replica of a launch once they are ready)
        lines[0] += f"\nServing the demo pack from {settings.demo_dir} (ready within a minute when it is shipped)"
        lines += [f"  curl {url}/predict/transformer -H 'content-type: application/json'{key} "
                  """-d '{"prompt": "The robot", "max_new_tokens": 24}'""",
                  f"  curl {url}/v1/completions -H 'content-type: application/json'{key} "
                  """-d '{"model": "demo-transformer", "prompt": "Once upon a time", "max_tokens": 24}'"""]
    if key:
        lines.append("  (API keys are on: set VLA_API_KEY to one of them first)")
    return lines


def _announce(settings, port: int) -> None:
    """The banner, once the server listens on ``port`` (the one the system chose for port 0)."""
    lines = banner_lines(settings, port)
    _say(settings.log_format, "\n" + "\n".join(lines) + "\n", message="listening",
         url=base_url(settings.host, port), hints=lines)


def _leaving_with_model_threads(started: bool, loading: list[str], calling: list[str] = ()) -> tuple[int, str]:
    """What the log says when the process leaves its model threads running. A server that never started (its
    port taken, a replica stopped while loading) drained nothing: it only abandons the loads, as it does when
    stopped while loading. A model call that outlived the drain is a warning, loads left behind or not."""
    names = ", ".join(loading) or "a model thread"
    if not started:
        return logging.INFO, f"the server did not start: exiting without waiting for {names} to finish loading"
    if calling:
        also = f", and without waiting for {', '.join(loading)} to finish loading" if loading else ""
        return logging.WARNING, (f"exiting with a model call of {', '.join(calling)} still running "
                                 f"(VLA_DRAIN_TIMEOUT_S passed){also}")
    if loading:
        return logging.INFO, f"exiting without waiting for {names} to finish loading"
    return logging.WARNING, "exiting with a model call still running (VLA_DRAIN_TIMEOUT_S passed)"


@dataclass(frozen=True)
class _LaunchedReplica:
    replica: "Replica"
    num_gpus: int  # the GPUs the launcher gave it (CUDA_VISIBLE_DEVICES), numbered from 0 in it


def _replica_of_launch(args: argparse.Namespace, settings) -> Optional[_LaunchedReplica]:
    """This process as one replica of ``vla-foundry serve --replicas`` (service/launcher.py), else None."""
    if args.listen_fd is None:
        return None
    from service.launcher import GPU_ENV
    from service.replicas import Replica

    gpus = os.environ.get(GPU_ENV)
    num_gpus = len([g for g in gpus.split(",") if g.strip()]) if gpus is not None else _gpu_count()
    return _LaunchedReplica(Replica.of_this_process("vla-foundry serve --replicas", args.replica_index), num_gpus)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _draining_server(uvicorn, app, drain_timeout_s: float, announce: Optional[Callable[[int], None]] = None,
                     log_format: str = "text"):
    """uvicorn's server, whose shutdown first stops listening, then closes the robot websockets with 1001 after
    their replies in flight (uvicorn alone would cut them with 1012), then drains as uvicorn does.

    ``announce(port)`` is called once it listens (the port the system chose for port 0). A port it cannot listen on
    is one line naming the fix, and exit status 2, instead of uvicorn's error. A second Ctrl-C during the drain
    ends the process at once (exit 130) instead of waiting for the requests in flight."""
    from service.launcher import BIND_ERRORS, CONFIG_ERROR, INTERRUPTED, SECOND_INTERRUPT, cannot_listen

    class BindFailure(logging.Filter):
        """uvicorn logs an address it cannot listen on as the bare OSError (then shuts the app down and exits):
        said instead as one line naming the fix."""

        def __init__(self, host: str, port: int) -> None:
            super().__init__()
            self.host, self.port, self.failed = host, port, False

        def filter(self, record: logging.LogRecord) -> bool:
            error = record.msg
            if not (isinstance(error, socket.gaierror) or isinstance(error, OSError) and error.errno in BIND_ERRORS):
                return True
            self.failed = True
            _say_error(log_format, cannot_listen(self.host, self.port, record.msg))
            return False

    class DrainingServer(uvicorn.Server):
        stop_requested = False  # SIGTERM or Ctrl-C came (read while a replica waits for its models to load)

        def handle_exit(self, sig, frame) -> None:
            if sig == signal.SIGINT and DrainingServer.stop_requested:
                # A second Ctrl-C (after a Ctrl-C or SIGTERM): leave now, whatever is in flight (uvicorn's own
                # "force exit" would wait for the robot websockets, then log a traceback).
                logging.getLogger("service").warning(SECOND_INTERRUPT)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(INTERRUPTED)
            DrainingServer.stop_requested = True
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None) -> None:
            # (A replica is handed the launcher's bound socket: it binds nothing.)
            bind_failure = BindFailure(self.config.host, self.config.port) if sockets is None else None
            uvicorn_log = logging.getLogger("uvicorn.error")
            if bind_failure is not None:
                uvicorn_log.addFilter(bind_failure)
            try:
                await super().startup(sockets)
            except SystemExit:
                if bind_failure is None or not bind_failure.failed:
                    raise
                raise SystemExit(CONFIG_ERROR) from None  # (as a launcher that cannot listen exits)
            finally:
                if bind_failure is not None:
                    uvicorn_log.removeFilter(bind_failure)
            if self.started and announce is not None:
                # Port 0: the one the system chose (the first address's, where a host name has several).
                announce(self.config.port or self.servers[0].sockets[0].getsockname()[1])

        async def shutdown(self, sockets=None) -> None:
            deadline = time.monotonic() + drain_timeout_s  # one drain, websockets and requests together
            app.state.draining = True  # what is still running at the deadline is cut off (metrics.RequestMetrics)
            for server in self.servers:
                server.close()
            await app.state.fleet.stop()  # out of the fleet's listing while it drains
            await app.state.robot_sockets.close_all(timeout=drain_timeout_s)
            self.config.timeout_graceful_shutdown = max(0.0, deadline - time.monotonic())
            await super().shutdown(sockets)

    return DrainingServer


def _demo(args: argparse.Namespace) -> int:
    from vla_foundry.demo import DEMO_MEMBERS, ensure_demo_pack, export_pack

    refusal = _demo_dir_refusal(args.dir, "--dir")
    if refusal is not None:  # (mkdir's traceback, deep in the build, otherwise)
        print(f"vla-foundry demo: {refusal}", file=sys.stderr)
        return 2  # a usage error, as argparse's
    demo_dir = ensure_demo_pack(args.dir, progress=True, rebuild=args.rebuild)
    if args.ship:
        print(f"shipped pack written to {export_pack(demo_dir)}", file=sys.stderr)
    for member in DEMO_MEMBERS:
        print(demo_dir / member)
    return 0


def _demo_dir_refusal(path: Path, flag: str) -> Optional[str]:
    """Why the demo pack cannot be made in ``path`` (a file is in the way), or None."""
    in_the_way = _file_in_the_way(path)
    if in_the_way is None:
        return None
    what = "is" if in_the_way == path else f"cannot be made: {in_the_way} is"
    return (f"{flag} {path} {what} a file, not a directory; give a directory (made when missing), or leave it out "
            "for the default")


def settings_error(error: ValueError, config: Optional[Path] = None) -> str:
    """A settings error as one line per problem: the setting (where it was set: the deployment file ``config``, or
    VLA_CONFIG's, for a key the file holds; else its VLA_ variable), what is wrong, and the closest known name for
    an unknown one; pydantic's dump otherwise."""
    from difflib import get_close_matches

    from pydantic import ValidationError

    from service.settings import DeploymentSpec, Settings, deployment_file_keys

    if not isinstance(error, ValidationError):
        return str(error)
    config, in_file = deployment_file_keys(config)
    lines = []
    for problem in error.errors():
        loc = [p for p in problem.get("loc", ()) if not str(p).startswith(("function-", "constrained-", "literal["))]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "settings"
        if len(loc) == 1 and problem.get("type") != "extra_forbidden":
            where = f"{where} (in {config})" if str(loc[0]) in in_file else f"{where} (VLA_{str(loc[0]).upper()})"
        message = str(problem.get("msg", "invalid")).removeprefix("Value error, ")
        if problem.get("type") == "extra_forbidden" and loc:
            known = DeploymentSpec.model_fields if len(loc) > 1 else Settings.model_fields
            close = get_close_matches(str(loc[-1]), list(known), n=1)
            message = "unknown setting" + (f"; did you mean {close[0]!r}?" if close else "")
        lines.append(f"{where}: {message}")
    return "\n  ".join(dict.fromkeys(lines))


def _file_in_the_way(path: Path) -> Optional[Path]:
    """``path`` or the nearest of its parents that exists, when that is not a directory (a file, a device):
    no directory can be made there."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _models(args: argparse.Namespace) -> int:
    from vla_foundry.models import list_registered_batch_handlers, list_registered_models, model_modality

    print("registered models:")
    for key in list_registered_models():
        print(f"  {key:<20} {model_modality(key)}")
    print("registered batch handlers:")
    for key in list_registered_batch_handlers():
        print(f"  {key}")
    return 0


def plain_text(docstring: str) -> str:
    """A docstring as a terminal shows it: reStructuredText's double backticks and roles (:func: and the like)
    dropped, their text kept."""
    return re.sub(r"(?::[\w.-]+:)?`+([^`]+)`+", r"\1", docstring)


def build_parser() -> argparse.ArgumentParser:
    from vla_foundry.demo_paths import DEFAULT_DEMO_DIR

    parser = argparse.ArgumentParser(prog="vla-foundry", description=plain_text(__doc__.splitlines()[0]))
    sub = parser.add_subparsers(dest="command", required=True)
    # No abbreviated options: `--por 9001` taken for `--port` would get past the container entrypoint's refusal of
    # --port, and a prefix that a later option makes ambiguous would break a command that worked.
    serve = sub.add_parser("serve", allow_abbrev=False,
                           help="serve checkpoints over HTTP (the demo pack when none is given)")
    serve.add_argument("--config", type=Path, help="deployment YAML (device, dtype, deployments)")
    serve.add_argument("--checkpoint", action="append", metavar="DIR[=NAME]",
                       help="a VLA Foundry experiment directory to serve; repeatable")
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    serve.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto)")
    serve.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16 (default auto)")
    serve.add_argument("--demo-dir", type=Path, default=None, help=f"demo pack location (default {DEFAULT_DEMO_DIR})")
    serve.add_argument("--replicas", default=None,
                       help="server processes behind the one address: N, or per-gpu (default 1; VLA_REPLICAS)")
    serve.add_argument("--replicas-per-gpu", type=int, default=None,
                       help="with --replicas per-gpu: replicas sharing each GPU (default 1)")
    serve.add_argument("--gpus", default=None, help="GPUs for the replicas, as CUDA_VISIBLE_DEVICES names them "
                                                    "(default: every visible one; none: CPU replicas)")
    # Set by the launcher for each replica it starts (service/launcher.py), not by hand.
    serve.add_argument("--replica-index", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--launcher-pid", type=int, default=None, help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)
    demo = sub.add_parser("demo", allow_abbrev=False, help="build the demo pack")
    demo.add_argument("--dir", type=Path, default=DEFAULT_DEMO_DIR,
                      help=f"where to build it (default {DEFAULT_DEMO_DIR})")
    demo.add_argument("--rebuild", action="store_true", help="retrain every member from the project's code and data "
                                                              "(default: copy the shipped pack, train what it lacks)")
    demo.add_argument("--ship", action="store_true", help="maintainers: write the built pack into the package "
                                                           "(vla_foundry/demo/pack, safetensors and checksums)")
    demo.set_defaults(func=_demo)
    models = sub.add_parser("models", allow_abbrev=False, help="list registered model types and batch handlers")
    models.set_defaults(func=_models)
    return parser


def serve_command() -> list[str]:
    """How to start this CLI from another process of the same environment (tests and benches start servers):
    its ``vla-foundry`` script, else ``python -m service`` (an environment without the script installed)."""
    script = Path(sys.executable).parent / "vla-foundry"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a launch of replicas starts each with
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
