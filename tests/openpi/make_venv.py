"""Build the side environment that holds the real ``openpi-client`` (``make test`` runs this first).

``python tests/openpi/make_venv.py [DIR]`` creates a venv at DIR (default ``.venv-openpi`` in the
repository) and installs ``tests/openpi/requirements.txt`` into it; a ``.ready`` file records the
requirements it was built from, so a second run with the same pins does nothing.

If the install fails because the package registry cannot be reached, the reason is written to
``UNAVAILABLE`` in DIR and the script exits 0: the openpi test then skips with that reason. Any
other failure (a pin that does not resolve, a broken build) exits non-zero and fails ``make test``.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"
DEFAULT_DIR = HERE.parents[1] / ".venv-openpi"
# What pip prints when it cannot reach an index at all (as opposed to reaching it and finding no match).
UNREACHABLE = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
               "Name or service not known", "Network is unreachable", "Connection refused", "ConnectTimeout",
               "Failed to establish a new connection")


def python_of(directory: Path) -> Path:
    return directory / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def fingerprint() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def unavailable_reason(directory: Path = DEFAULT_DIR) -> str | None:
    marker = directory / "UNAVAILABLE"
    return marker.read_text().strip() if marker.exists() else None


def is_ready(directory: Path = DEFAULT_DIR) -> bool:
    ready = directory / ".ready"
    return ready.exists() and ready.read_text().strip() == fingerprint() and python_of(directory).exists()


def ensure(directory: Path = DEFAULT_DIR) -> int:
    """Build the environment unless it is ready; 0 when it is ready or the registry is unreachable."""
    if is_ready(directory):
        return 0
    shutil.rmtree(directory, ignore_errors=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(directory)
    result = subprocess.run([str(python_of(directory)), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                             "-r", str(REQUIREMENTS)], capture_output=True, text=True)
    if result.returncode == 0:
        (directory / ".ready").write_text(fingerprint() + "\n")
        return 0
    output = result.stdout + result.stderr
    print(output[-4000:], file=sys.stderr)
    if any(marker in output for marker in UNREACHABLE):
        (directory / "UNAVAILABLE").write_text("the package registry could not be reached to install "
                                               f"openpi-client ({REQUIREMENTS.name}): "
                                               + next(m for m in UNREACHABLE if m in output) + "\n")
        print("openpi side environment not built: registry unreachable; its test will skip", file=sys.stderr)
        return 0
    print(f"openpi side environment: pip failed (exit {result.returncode}) with the registry reachable",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(ensure(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR))
