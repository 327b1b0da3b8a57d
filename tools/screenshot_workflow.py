"""Screenshots of an example workflow in the real ComfyUI web UI, for the README.

Writes <out>_running.png (ESD Erase Concept half way through training: the live loss chart and the preview) and
<out>_after_run.png (when the run ended), the README's two screenshots, and prints what the page shows on the ESD
nodes. Default: the toy workflow, out docs/workflow_esd_toy.

Needs Debian's Chromium and Playwright (tools/setup_browser.sh and the project's venv; never `playwright install`)
and a host with the toy checkpoint: either `make comfy` (then pass nothing) or `--start-host`, which starts a
temporary real host with this checkout and the toy model (built once and cached like the host tests do).
Run from the repository root:
  .venv/bin/python tools/screenshot_workflow.py [--start-host] [--workflow workflows/esd_toy_erase_in_comfyui.json]
                                                [--url http://127.0.0.1:8188] [--out docs/workflow_esd_toy]
The run erases with 24 iterations at learning rate 5e-4 (a preview every 4, DDIM 4 for x_t) and samples 2 steps
on the toy's 16x16 latents (128 "px" in ComfyUI's latent units). It warns about widget values the server does not
offer (a workflow out of step with the nodes' widgets). The host's settings are left alone: the page gets its UI
settings from this script.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "host"))
sys.path.insert(0, str(ROOT))
from browser import chromium, fit_view, open_comfy, save_png  # noqa: E402

CHECKPOINT = "esd_toy_sd15.safetensors"  # what `make comfy` installs (esd_bench/comfy_toy.py)
# Widget values for the small run: {node type: {widget name: value}}; the running screenshot is taken half way.
SMALL_RUN = {"ESDTrain": {"iterations": 24, "ddim_steps": 4, "resolution": 128, "preview_every": 4,
                          "learning_rate": 5e-4},
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

# Shrink the run and give ESDTrain a new seed (so a second run is not served from the server's cache), queue it
# like the Run button does, and collect what the server sends until the prompt ends (in window.esdRun).
RUN_JS = """(small) => {
  const app = window.app, api = window.comfyAPI.api.api;
  for (const node of app.graph.nodes) {
    const values = {...(small[node.type] ?? {})};
    if (node.type === 'ESDTrain') values.seed = Date.now() % 1000000;
    for (const w of node.widgets ?? []) if (w.name in values) { w.value = values[w.name]; w.callback?.(w.value); }
  }
  const seen = window.esdRun = {progress_text: [], executed: {}, result: null};
  api.addEventListener('progress_text', e => seen.progress_text.push(`#${e.detail.nodeId}: ${e.detail.text}`));
  api.addEventListener('executed', e => { seen.executed[e.detail.node] = e.detail.output; });
  api.addEventListener('execution_success', () => { seen.result = 'success'; });
  api.addEventListener('execution_error', e => { seen.result = `error in #${e.detail.node_id} ${e.detail.node_type}: `
                                                 + e.detail.exception_message.trim(); });
  app.queuePrompt(0, 1);
}"""

# ESD Erase Concept's chart has `points` points and a preview is on the node; then center the view on it.
TRAINING_JS = """(points) => {
  const node = window.app.graph.nodes.find(n => n.type === 'ESDTrain');
  const chart = node?.widgets?.find(w => w.name === 'esd_live_view')?.element;
  return chart?.dataset.phase === 'training' && Number(chart.dataset.points) >= points && (node.imgs ?? []).length > 0;
}"""
FOCUS_JS = """() => {
  const canvas = window.app.canvas, node = window.app.graph.nodes.find(n => n.type === 'ESDTrain');
  canvas.ds.scale = 1.0;
  canvas.ds.offset[0] = 40 - node.pos[0] + 380;
  canvas.ds.offset[1] = 60 - node.pos[1];
  canvas.setDirty(true, true);
}"""

# What the page shows: each ESD node's widgets, its progress-text widget's value and its live view's status.
INSPECT_JS = """() => window.app.graph.nodes.filter(n => /^(ESD|LoadFrozen|ApplyErased|SaveErased)/.test(n.type))
  .map(n => ({
    node: `${n.type} #${n.id}`,
    widgets: (n.widgets ?? []).map(w => w.name),
    progress_text_widget: (n.widgets ?? []).find(w => w.name === '$$node-text-preview')?.value ?? null,
    live_view: (n.widgets ?? []).find(w => w.name === 'esd_live_view')?.element
      .querySelector('.esd-live-status').textContent ?? null,
  }))"""


def shoot(page, workflow_path: Path, out: str) -> None:
    """Load the workflow, run it small, screenshot it half way through training and when the run ended."""
    t0 = time.time()
    bad = page.evaluate(LOAD_JS, [json.loads(workflow_path.read_text()), workflow_path.stem, CHECKPOINT])
    for line in bad:
        print("WARNING: widget value out of step with the server:", line)
    print(f"workflow loaded in {time.time() - t0:.0f} s")

    t0 = time.time()
    page.evaluate(RUN_JS, SMALL_RUN)
    page.wait_for_function(TRAINING_JS, arg=SMALL_RUN["ESDTrain"]["iterations"] // 2, timeout=30 * 60_000,
                           polling=250)
    page.evaluate(FOCUS_JS)
    page.wait_for_timeout(800)
    save_png(page.screenshot(), Path(out + "_running.png"))
    print(f"training shown after {time.time() - t0:.0f} s")
    page.wait_for_function("window.esdRun.result !== null", timeout=60 * 60_000, polling=500)
    seen = page.evaluate("window.esdRun")
    print(f"run: {seen['result']} after {time.time() - t0:.0f} s")
    print("progress_text events:", json.dumps(seen["progress_text"][-6:], indent=1))
    print("executed ui outputs:", json.dumps(seen["executed"], indent=1))
    fit_view(page)  # the chart and the images make ESD Erase Concept taller: fit again
    page.wait_for_timeout(1500)
    print("on the page:", json.dumps(page.evaluate(INSPECT_JS), indent=1))
    save_png(page.screenshot(), Path(out + "_after_run.png"))
    if seen["result"] != "success":
        raise SystemExit(f"the run failed (the after-run screenshot shows the error): {seen['result']}")


def temporary_host(folder: Path):
    """A real host with this checkout and the toy checkpoint (tests/host/comfy_server.py)."""
    from comfy_server import ComfyServer
    from tools.bench_preview import toy_checkpoint

    server = ComfyServer(folder / "host")
    server.start()
    (server.checkpoints_dir / CHECKPOINT).symlink_to(toy_checkpoint(folder).resolve())
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workflow", type=Path, default=ROOT / "workflows/esd_toy_erase_in_comfyui.json")
    ap.add_argument("--url", default="http://127.0.0.1:8188")
    ap.add_argument("--start-host", action="store_true", help="start a temporary host with the toy checkpoint")
    ap.add_argument("--out", default=str(ROOT / "docs/workflow_esd_toy"), help="path prefix of the two PNGs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="esd-screenshot-") as tmp:
        server = temporary_host(Path(tmp)) if args.start_host else None
        try:
            with chromium() as browser:
                page = open_comfy(browser, server.url if server else args.url)
                shoot(page, args.workflow, args.out)
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
