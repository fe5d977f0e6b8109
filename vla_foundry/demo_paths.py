"""Where the demo pack lives by default (``VLA_DEMO_DIR`` overrides it)."""

import os
from pathlib import Path

DEFAULT_DEMO_DIR = Path(os.environ.get("VLA_DEMO_DIR") or Path.home() / ".cache" / "vla_foundry" / "demo")
