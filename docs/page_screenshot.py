"""The README's picture of the page at /: the demo pack served, every form used once, a full-page screenshot.

    .venv/bin/python docs/page_screenshot.py docs/page.png     # needs Chromium (apt-get install chromium)
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.service.live_server import live_server  # noqa: E402
from vla_foundry.demo import vlm as shapes  # noqa: E402


def main(out: str) -> int:
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp, live_server([], Path(tmp) / "demo", timeout=300) as base:
        image = Path(tmp) / "shape.png"
        Image.fromarray(shapes.draw("blue", "square", "right", random.Random(1))).save(image)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(base + "/")
            page.wait_for_selector("#deployments tr[data-name=demo-diffusion_policy]")
            done = "() => !['', '…'].includes(document.querySelector('{}').textContent)"
            page.click("#text-form button[type=submit]")
            page.wait_for_function(done.format("#text-out"))
            page.set_input_files("#caption-form input[type=file]", str(image))
            page.click("#caption-form button[type=submit]")
            page.wait_for_function(done.format("#caption-out"))
            page.click("#image-form button[type=submit]")
            page.wait_for_selector("#image-out img", timeout=120_000)
            page.select_option("#chat-form select", "demo-transformer_hf")
            page.click("#chat-form button[type=submit]")
            page.wait_for_selector("#chat-log .chat-assistant", timeout=60_000)
            page.click("#robot-form button[type=submit]")
            page.wait_for_selector("#robot-out[data-result]", timeout=60_000)
            page.screenshot(path=out, full_page=True)
            browser.close()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/page.png"))
