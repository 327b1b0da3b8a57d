"""Drive ComfyUI's real frontend in headless Chromium (Debian's `chromium` package, driven by Playwright's Python
package; never `playwright install`, never a browser download). Used by test_browser.py and
tools/screenshot_workflow.py; tools/setup_browser.sh installs both.

    with chromium() as browser:
        page = open_comfy(browser, server_url, {"Comfy.VueNodes.Enabled": True})
        load_workflow_file(page, path)          # through the frontend's own "Open workflow" file input
"""
from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from PIL import Image

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}
# No first-run templates dialog, no minimap, no "Nodes 2.0" banner; tests add the node renderer of their choice.
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.VueNodes.Enabled": False}
SETUP_HINT = "run tools/setup_browser.sh (make test does) to install Debian's chromium and Playwright"


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise RuntimeError(f"no chromium on PATH: {SETUP_HINT}")
    return path


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium with a fresh profile (a persistent context: Playwright's launch of a system browser)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise RuntimeError(f"Playwright's Python package is missing: {SETUP_HINT}") from None
    with tempfile.TemporaryDirectory(prefix="esd-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(profile, executable_path=chromium_path(),
                                                        args=CHROMIUM_ARGS, viewport=VIEWPORT)
        try:
            yield context
        finally:
            context.close()


def serve_ui_settings(page, settings: dict) -> None:
    """The page reads `settings` on top of the server's own, and its setting writes never reach the server (several
    pages of a test session share one server)."""
    def handle(route):
        if route.request.method != "GET":
            return route.fulfill(status=200, body="")
        response = route.fetch()
        return route.fulfill(response=response, json={**response.json(), **settings})
    page.route("**/api/settings", handle)
    page.route("**/api/settings/*", lambda route: route.fulfill(status=200, body="")
               if route.request.method != "GET" else route.continue_())
    page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")


def open_comfy(context, url: str, settings: dict | None = None, timeout_ms: int = 120_000):
    """A new page with the ComfyUI frontend loaded (the app, its canvas and every extension set up)."""
    page = context.new_page()
    page.console_messages = []  # what the page logged, for failure messages
    page.on("console", lambda m: page.console_messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: page.console_messages.append(f"pageerror: {e}"))
    serve_ui_settings(page, {**UI_SETTINGS, **(settings or {})})
    page.goto(url)
    page.wait_for_function("window.app?.graph && window.app.canvas && window.app.extensionManager",
                           timeout=timeout_ms)
    return page


def load_workflow_file(page, path: Path) -> None:
    """Open a workflow file the way a user does (Workflow > Open: the frontend's file input)."""
    page.evaluate("window.app.graph.clear()")  # so the loaded graph is told from the one before
    page.set_input_files("#comfy-file-input", str(path))
    page.wait_for_function("window.app.graph.nodes.length > 0", timeout=30_000)


def fit_view(page) -> None:
    page.evaluate("""async () => {
      await window.app.extensionManager.command.execute('Comfy.Canvas.FitView');
      window.app.canvas.setDirty(true, true);
    }""")
    page.wait_for_timeout(500)


def save_png(png: bytes, path: Path, max_bytes: int = 400_000) -> None:
    """Save a screenshot; over `max_bytes`, as a 256-colour PNG (nothing visible is lost on a UI), then smaller."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image, data = Image.open(io.BytesIO(png)), png
    while len(data) > max_bytes:
        buf = io.BytesIO()
        image.quantize(256, method=Image.Quantize.MEDIANCUT).save(buf, "PNG", optimize=True)
        data = buf.getvalue()
        image = image.resize((image.width * 9 // 10, image.height * 9 // 10), Image.Resampling.LANCZOS)
    path.write_bytes(data)
