"""The GPU check's scripts still run: ``bench/gpu_check.py --smoke`` runs every step of ``make gpu-check`` on the
CPU with tiny models and short rows. Sessions with a GPU are rare and short; a bench that broke since the last one
(a renamed field, a changed return type) would spend that time on a traceback instead of a measurement."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_step_of_the_gpu_check_runs_on_the_cpu():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    summary = result.stdout[result.stdout.rindex("## GPU check"):] if "## GPU check" in result.stdout else ""
    assert result.returncode == 0, f"{summary}\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    for step in ("tests", "generate", "images", "policy", "fleet", "text"):
        assert f"| {step} | ok |" in summary, summary
    # Each bench printed its table, not only an exit status.
    assert "| 1 |" in result.stdout and "tokens/s" in result.stdout and "req/s" in result.stdout
