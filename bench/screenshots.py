"""Screenshots of the live console (:9093/) for the README: ``docs/images/console-*.png``.

Starts the same installation the console's browser test uses (simulator, gateway,
custom-metrics, the dashboards service and Debian's Prometheus, users in two teams sending
traffic), lets traffic run for ``--warmup`` seconds so the charts have a history, then opens the
sign-in page and every dashboard in headless Chromium and saves each page.

    PYTHONPATH=src python bench/screenshots.py [--warmup 90] [--out docs/images]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT / "tests"))
sys.path.insert(0, str(_ROOT / "tests" / "observability"))

from citadel.observability.dashboards import DASHBOARDS  # noqa: E402

from console_stack import console_stack  # noqa: E402

_SETTLED = """() => {
  const panels = [...document.querySelectorAll("main .panel")];
  return panels.length > 0 && panels.every((p) => p.dataset.state !== "loading");
}"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=float, default=90.0, help="seconds of traffic first")
    parser.add_argument("--out", type=Path, default=_ROOT / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, console_stack(Path(tmp)) as stack:
        print(f"traffic for {args.warmup:.0f} s ...", flush=True)
        time.sleep(args.warmup)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium",
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            try:
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.goto(stack.console + "/")
                page.wait_for_selector("#login:not([hidden])")
                page.screenshot(path=str(args.out / "console-sign-in.png"))
                page.fill("#key", stack.readonly_key)
                page.click("#login button[type=submit]")
                page.wait_for_selector("#tabs a")
                for board in DASHBOARDS:
                    page.evaluate(f"location.hash = '#/{board.uid}'")
                    page.wait_for_function(
                        f"() => document.title.startsWith({board.title!r})", timeout=10_000
                    )
                    page.wait_for_function(_SETTLED, timeout=30_000)
                    page.mouse.move(0, 0)
                    path = args.out / f"console-{board.uid.removeprefix('citadel-')}.png"
                    page.screenshot(path=str(path), full_page=True)
                    print(f"wrote {path.relative_to(_ROOT)}", flush=True)
            finally:
                browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
