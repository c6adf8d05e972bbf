"""Render a run's HTML report to a PNG screenshot with headless Chromium.

Given a store, the report is written first (beside the store, or under ``--report-dir``); given an
``.html`` file, that file is rendered as it is. Chromium runs with no network access to speak of and
a throwaway profile, so the screenshot shows exactly what the self-contained page shows.

Run from the repository root::

    python scripts/render_report.py runs/demo.zarr --output /tmp/demo.png

Chromium comes from the distribution (``apt-get install -y chromium`` on Debian).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_FLAGS = (
    "--headless",
    "--no-sandbox",  # root in containers has no user namespace for the sandbox
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    """Path of a Chromium executable: ``$CHROMIUM``, ``/usr/bin/chromium``, or one on ``PATH``."""
    candidates = [os.environ.get("CHROMIUM"), "/usr/bin/chromium", *map(shutil.which, CHROMIUM_NAMES)]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def render_png(
    html_path: str | os.PathLike,
    png_path: str | os.PathLike,
    width: int = 1280,
    height: int = 2000,
    chromium: str | None = None,
    timeout: float = 120.0,
) -> Path:
    """Screenshots the top ``width`` x ``height`` pixels of a local HTML file.

    Args:
        html_path: the page to render.
        png_path: where to write the PNG.
        width: viewport width in pixels.
        height: viewport height in pixels; what lies below is cut off.
        chromium: the browser executable; found with :func:`find_chromium` by default.
        timeout: seconds before the browser is given up on.

    Returns:
        The PNG's path.

    Raises:
        FileNotFoundError: no Chromium is installed.
        RuntimeError: Chromium exited without writing the screenshot.
    """
    browser = chromium or find_chromium()
    if browser is None:
        raise FileNotFoundError("No Chromium found; install it with `apt-get install -y chromium`.")
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)  # a stale screenshot must not pass for a new one
    with tempfile.TemporaryDirectory(prefix="render-report-") as profile:
        cmd = [
            browser,
            *_FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={width},{height}",
            Path(html_path).resolve().as_uri(),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if not png.is_file():
        raise RuntimeError(
            f"Chromium exited with {done.returncode} and no screenshot:\n{done.stderr[-2000:]}"
        )
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a gradient store (path or URL) or an HTML report")
    parser.add_argument("--output", "-o", required=True, help="the PNG to write")
    parser.add_argument("--report-dir", help="where the store's reports live, when not beside it")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2000)
    args = parser.parse_args(argv)
    source = args.source
    if not source.endswith((".html", ".htm")):
        from mstore_lightning.reports.html import write_report

        source = write_report(source, report_dir=args.report_dir)
        print(f"report: {source}")
    png = render_png(source, args.output, width=args.width, height=args.height)
    print(f"screenshot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
