"""Open a run's report.html in headless Chromium: what went wrong on the page, and optionally a screenshot.

Why a real browser: report.html is what a reader opens; a figure that does not decode or a script error shows
only there. Playwright drives the Chromium of the system's packages (Debian: chromium-headless-shell or
chromium, installed by `scripts/setup.sh --dev`), since Playwright's own browser download is not reachable
everywhere.

    python scripts/report_in_browser.py runs/demo --screenshot docs/figures/demo_report.png --height 1660
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

CANDIDATES = (
    "/usr/lib/chromium/chromium-headless-shell",  # Debian's chromium-headless-shell (the binary its wrapper runs)
    "/usr/lib/chromium/chromium",  # Debian's chromium
    "chromium-headless-shell", "chromium", "chromium-browser", "google-chrome",
)
IMAGES = "Array.from(document.images).map(i => ({src: i.src.slice(0, 40), complete: i.complete, width: i.naturalWidth}))"


def find_chromium() -> str | None:
    """$MOPD_CHROMIUM, else the first Chromium found among CANDIDATES, else None."""
    for candidate in (os.environ.get("MOPD_CHROMIUM"), *CANDIDATES):
        if candidate and (path := shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)):
            return path
    return None


def inspect_report(run_dir: Path, screenshot: Path | None = None, width: int = 1280, height: int | None = None) -> dict:
    """Load RUN/report.html; returns {"errors": console errors and page errors, "images": each <img>'s
    completeness and natural width, "title": the page title}; with `screenshot`, a PNG of the whole page (or of
    its top `height` pixels)."""
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found: apt-get install chromium-headless-shell, or set MOPD_CHROMIUM")
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto((Path(run_dir) / "report.html").resolve().as_uri(), wait_until="load")
            result = {"errors": errors, "images": page.evaluate(IMAGES), "title": page.title()}
            if screenshot is not None:
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                clip = {"x": 0, "y": 0, "width": width, "height": height} if height else None
                page.screenshot(path=str(screenshot), full_page=True, clip=clip)
        finally:
            browser.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("--height", type=int, default=None, help="screenshot only the page's top HEIGHT pixels")
    parser.add_argument("--find", action="store_true", help="print the Chromium found (exit 1 if none) and stop")
    args = parser.parse_args()
    if args.find or args.run_dir is None:
        chromium = find_chromium()
        print(chromium or "no Chromium found")
        return 0 if chromium else 1
    result = inspect_report(args.run_dir, args.screenshot, height=args.height)
    print(json.dumps(result, indent=2))
    broken = [i for i in result["images"] if not i["complete"] or i["width"] == 0]
    return 1 if result["errors"] or broken else 0


if __name__ == "__main__":
    sys.exit(main())
