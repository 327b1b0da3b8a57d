"""Screenshots of an example workflow in the real ComfyUI web UI, for the README.

Writes <out>.png (the workflow as loaded) and <out>_after_run.png (after a tiny run, with the text the ESD nodes
send under the node) and prints what the page shows on the ESD nodes. Default out: docs/workflow_esd_x.

Needs:
  * the host running, with the toy checkpoint:    make comfy            (stop it afterwards: make comfy-stop)
  * Debian's Chromium:                             apt-get install -y chromium
  * Playwright and Pillow in a throwaway venv, not the project's (never run `playwright install`: the browser
    is Debian's):                                  python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright pillow
Run from the repository root:
  /tmp/pw/bin/python tools/screenshot_workflow.py [--workflow workflows/esd_x_erase_artist_style.json]
                                                  [--url http://127.0.0.1:8188] [--out docs/workflow_esd_x]
The run trains 3 iterations and samples 2 steps on the toy's 16x16 latents (128 "px" in ComfyUI's latent units).
It warns about widget values the server does not offer (a workflow out of step with the nodes' widgets).
The host's settings are left alone: the page gets its UI settings from this script, and its writes are dropped.
"""
import argparse
import io
import json
import tempfile
import time
from pathlib import Path

from PIL import Image
from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}
CHECKPOINT = "esd_toy_sd15.safetensors"  # what `make comfy` installs (esd_bench/comfy_toy.py)
MAX_BYTES = 400_000
# The classic canvas, no first-run templates dialog, no minimap (settings the page reads from GET /api/settings).
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.VueNodes.Enabled": False, "Comfy.Minimap.Visible": False}
# Widget values for the tiny run: {node type: {widget name: value}}.
TINY_RUN = {"ESDTrain": {"iterations": 3, "ddim_steps": 4, "resolution": 128},
            "EmptyLatentImage": {"width": 128, "height": 128, "batch_size": 1},
            "KSampler": {"steps": 2}}

# Load the workflow into a tab named after it; point checkpoint widgets whose file this host lacks at the toy.
# Returns the widgets left with a value the server does not offer (a workflow whose values are out of step).
LOAD_JS = """async ([workflow, name, ckpt]) => {
  await window.app.loadGraphData(workflow, true, true, name);
  const bad = [];
  for (const node of window.app.graph.nodes)
    for (const w of node.widgets ?? []) {
      const options = w.options?.values;
      if (!Array.isArray(options) || options.includes(w.value)) continue;
      if (w.name === 'ckpt_name') w.value = ckpt;
      else bad.push(`${node.type} #${node.id}: ${w.name} = ${JSON.stringify(w.value)} (not one of its options)`);
    }
  return bad;
}"""

FIT_JS = """async () => {
  await window.app.extensionManager.command.execute('Comfy.Canvas.FitView');
  window.app.canvas.setDirty(true, true);
}"""

# Shrink the run and give ESDTrain a new seed (so a second run is not served from the server's cache), queue it
# like the Run button does, and collect what the server sends until the prompt ends.
RUN_JS = """async (tiny) => {
  const app = window.app, api = window.comfyAPI.api.api;
  for (const node of app.graph.nodes) {
    const values = {...(tiny[node.type] ?? {})};
    if (node.type === 'ESDTrain') values.seed = Date.now() % 1000000;
    for (const w of node.widgets ?? []) if (w.name in values) w.value = values[w.name];
  }
  const seen = {progress_text: [], executed: {}};
  api.addEventListener('progress_text', e => seen.progress_text.push(`#${e.detail.nodeId}: ${e.detail.text}`));
  api.addEventListener('executed', e => { seen.executed[e.detail.node] = e.detail.output; });
  seen.result = await new Promise(resolve => {
    api.addEventListener('execution_success', () => resolve('success'));
    api.addEventListener('execution_error', e => resolve(`error in #${e.detail.node_id} ${e.detail.node_type}: `
                                                         + e.detail.exception_message.trim()));
    app.queuePrompt(0, 1);
  });
  return seen;
}"""

# What the page shows: each ESD node's widgets and its progress-text widget's value, and the text of every DOM
# widget drawn over the canvas (where that widget renders).
INSPECT_JS = """() => ({
  nodes: window.app.graph.nodes.filter(n => /^(ESD|LoadFrozen|ApplyErased|SaveErased)/.test(n.type)).map(n => ({
    node: `${n.type} #${n.id}`,
    widgets: (n.widgets ?? []).map(w => w.name),
    progress_text_widget: (n.widgets ?? []).find(w => w.name === '$$node-text-preview')?.value ?? null,
  })),
  dom_widget_text: [...document.querySelectorAll('.dom-widget')].map(e => e.innerText.trim()).filter(t => t),
})"""


def serve_ui_settings(page: Page) -> None:
    """The page reads UI_SETTINGS on top of the host's own settings, and its setting writes never reach the host."""
    def handle(route):
        if route.request.method != "GET":
            return route.fulfill(status=200, body="")
        response = route.fetch()
        return route.fulfill(response=response, json={**response.json(), **UI_SETTINGS})
    page.route("**/api/settings", handle)
    page.route("**/api/settings/*", lambda route: route.fulfill(status=200, body="")
               if route.request.method != "GET" else route.continue_())
    page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")  # the "Nodes 2.0" banner


def save_png(png: bytes, path: Path) -> None:
    """Save a screenshot; over MAX_BYTES, as a 256-colour PNG (nothing visible is lost on a UI), then smaller."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image, data = Image.open(io.BytesIO(png)), png
    while len(data) > MAX_BYTES:
        buf = io.BytesIO()
        image.quantize(256, method=Image.Quantize.MEDIANCUT).save(buf, "PNG", optimize=True)
        data = buf.getvalue()
        image = image.resize((image.width * 9 // 10, image.height * 9 // 10), Image.Resampling.LANCZOS)
    path.write_bytes(data)
    print(f"wrote {path} ({len(data) // 1000} KB)")


def shoot(page: Page, url: str, workflow_path: Path, out: str) -> None:
    """Load the workflow, screenshot it, run it small, screenshot again."""
    t0 = time.time()
    page.goto(url)
    page.wait_for_function("window.app?.graph && window.app.canvas && window.app.extensionManager", timeout=120_000)
    bad = page.evaluate(LOAD_JS, [json.loads(workflow_path.read_text()), workflow_path.stem, CHECKPOINT])
    for line in bad:
        print("WARNING: widget value out of step with the server:", line)
    page.evaluate(FIT_JS)
    page.wait_for_timeout(1000)  # let the canvas and the DOM widgets settle
    print(f"page up and workflow loaded in {time.time() - t0:.0f} s")
    save_png(page.screenshot(), Path(out + ".png"))

    t0 = time.time()
    seen = page.evaluate(RUN_JS, TINY_RUN)
    print(f"run: {seen['result']} after {time.time() - t0:.0f} s")
    print("progress_text events:", json.dumps(seen["progress_text"], indent=1))
    print("executed ui outputs:", json.dumps(seen["executed"], indent=1))
    page.evaluate(FIT_JS)  # the text widgets make nodes taller: fit again
    page.wait_for_timeout(1500)
    print("on the page:", json.dumps(page.evaluate(INSPECT_JS), indent=1))
    save_png(page.screenshot(), Path(out + "_after_run.png"))
    if seen["result"] != "success":
        raise SystemExit(f"the run failed (the after-run screenshot shows the error): {seen['result']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workflow", type=Path, default=ROOT / "workflows/esd_x_erase_artist_style.json")
    ap.add_argument("--url", default="http://127.0.0.1:8188")
    ap.add_argument("--out", default=str(ROOT / "docs/workflow_esd_x"), help="path prefix of the two PNGs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(profile, executable_path="/usr/bin/chromium",
                                                        args=CHROMIUM_ARGS, viewport=VIEWPORT)
        try:
            page = browser.pages[0]
            serve_ui_settings(page)
            shoot(page, args.url, args.workflow, args.out)
        finally:
            browser.close()


if __name__ == "__main__":
    main()
