"""ESD Erase Concept's live training view in a real browser: ComfyUI's own frontend (the comfyui-frontend-package the
host serves) in headless Chromium, against the real host with this pack, with the classic canvas and with the
Vue-based nodes ("Nodes 2.0"). For each: open the example workflow through the frontend's file input, find no missing
node, run a short training on the tiny model and see the chart receive points, a preview image arrive on the node
and the final state; cancel a second run and see "cancelled ..., nothing saved". Screenshots go to the artifacts
folder printed at the end (ESD_TEST_ARTIFACTS, default .test-artifacts/browser). Chromium and Playwright come from
tools/setup_browser.sh (make test runs it); without them these tests fail, saying so."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from browser import chromium, fit_view, load_workflow_file, open_comfy, save_png
from comfy_server import ROOT

WORKFLOW = ROOT / "workflows" / "esd_x_erase_artist_style.json"
ARTIFACTS = Path(os.environ.get("ESD_TEST_ARTIFACTS", ROOT / ".test-artifacts" / "browser"))
ITERATIONS = 12
# CPU scale: the tiny model at 64 px, a few iterations, a preview every 4 (and before the first, after the last)
TINY_RUN = {"ESDTrain": {"iterations": ITERATIONS, "ddim_steps": 2, "resolution": 64, "preview_every": 4,
                         "learning_rate": 1e-4},
            "EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 1}}

# Set widgets by node type, like a user editing them; point checkpoint pickers at the tiny model.
SET_WIDGETS_JS = """([values, ckpt]) => {
  for (const node of window.app.graph.nodes) {
    const wanted = {...(values[node.type] ?? {})};
    if (node.widgets?.some(w => w.name === 'ckpt_name')) wanted.ckpt_name = ckpt;
    for (const w of node.widgets ?? []) {
      if (!(w.name in wanted)) continue;
      w.value = wanted[w.name];
      w.callback?.(w.value);  // what an edit in the UI calls (it also updates Vue nodes)
    }
  }
  window.app.graph.setDirtyCanvas(true, true);
}"""

# Every node's type is registered (no "missing node" placeholder) and no node carries an error.
MISSING_JS = """() => window.app.graph.nodes
  .filter(n => !LiteGraph.registered_node_types[n.type] || n.has_errors).map(n => n.type)"""

# Record the preview images ComfyUI's frontend receives for the ESD node, and collect ComfyUI's own events.
WATCH_JS = """(nodeId) => {
  const api = window.comfyAPI.api.api;
  window.esdSeen = {previews: 0, executed: null};
  api.addEventListener('b_preview_with_metadata', e => { if (String(e.detail.nodeId) === nodeId) window.esdSeen.previews++; });
  api.addEventListener('executed', e => { if (String(e.detail.node) === nodeId) window.esdSeen.executed = e.detail.output; });
}"""

# The live view of the ESD node as the page shows it: its state, text, and whether it is laid out on screen.
VIEW_JS = """(nodeId) => {
  const node = window.app.graph.getNodeById(Number(nodeId));
  const widget = node?.widgets?.find(w => w.name === 'esd_live_view');
  if (!widget) return null;
  const box = widget.element.getBoundingClientRect();
  return {phase: widget.element.dataset.phase, points: Number(widget.element.dataset.points),
          status: widget.element.querySelector('.esd-live-status').textContent,
          shown: widget.element.isConnected && box.width > 50 && box.height > 50,
          in_vue_node: !!widget.element.closest('[data-node-id]'),
          images_on_node: (node.imgs ?? []).length,
          serialized: JSON.stringify(node.serialize().widgets_values)};
}"""

# Center the canvas on a node at a scale where Vue nodes show their content (they draw placeholders when far out).
FOCUS_JS = """(nodeId) => {
  const canvas = window.app.canvas, node = window.app.graph.getNodeById(Number(nodeId));
  canvas.ds.scale = 0.9;
  const [w, h] = [canvas.canvas.clientWidth, canvas.canvas.clientHeight];
  canvas.ds.offset[0] = w / 2 / canvas.ds.scale - (node.pos[0] + node.size[0] / 2) - 250;
  canvas.ds.offset[1] = h / 2 / canvas.ds.scale - (node.pos[1] + node.size[1] / 2);
  canvas.setDirty(true, true);
}"""


@pytest.fixture(scope="module")
def artifacts(timings):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    timings["browser screenshots (folder)"] = str(ARTIFACTS)  # printed in the terminal summary
    return ARTIFACTS


def esd_node_id(page) -> str:
    return str(page.evaluate("window.app.graph.nodes.find(n => n.type === 'ESDTrain').id"))


def wait_view(page, node_id, predicate: str, timeout_s: float = 240):
    """Poll the live view until ``predicate`` (JS over `v`, the VIEW_JS result) holds; returns the view."""
    page.wait_for_function(f"id => {{ const v = ({VIEW_JS})(id); return v && ({predicate}); }}", arg=node_id,
                           timeout=timeout_s * 1000, polling=100)
    return page.evaluate(VIEW_JS, node_id)


def shoot(page, path: Path) -> None:
    page.wait_for_timeout(300)
    save_png(page.screenshot(), path)


@pytest.mark.parametrize("vue_nodes", [False, True], ids=["classic-canvas", "nodes-2.0"])
def test_live_view_in_the_browser(comfy_server, tiny_checkpoint, artifacts, timings, vue_nodes):
    ckpt = tiny_checkpoint("sd15")
    mode = "vue" if vue_nodes else "classic"
    t0 = time.monotonic()
    with chromium() as browser:
        page = open_comfy(browser, comfy_server.url, {"Comfy.VueNodes.Enabled": vue_nodes})
        try:
            assert "esd.concept_erasure.live_view" in page.evaluate("window.app.extensions.map(e => e.name)")
            load_workflow_file(page, WORKFLOW)
            assert page.evaluate(MISSING_JS) == []
            assert page.evaluate("document.querySelector('.comfy-missing-nodes')") is None
            node_id = esd_node_id(page)
            assert not page.evaluate(VIEW_JS, node_id)["shown"]  # no chart before the pack's first message
            page.evaluate(SET_WIDGETS_JS, [TINY_RUN | {"ESDTrain": {**TINY_RUN["ESDTrain"],
                                                                    "seed": int(time.time()) % 100000}}, ckpt])
            page.evaluate(FOCUS_JS, node_id)
            page.evaluate(WATCH_JS, node_id)

            page.click("[data-testid='queue-button'] button")  # Run
            running = wait_view(page, node_id, "v.phase === 'training' && v.points >= 2")
            assert running["shown"] and running["in_vue_node"] == vue_nodes, running
            assert f"/{ITERATIONS}" in running["status"] and "ETA" in running["status"]
            shoot(page, artifacts / f"{mode}_running.png")
            done = wait_view(page, node_id, "v.phase === 'done'")
            assert done["points"] == ITERATIONS  # every iteration's loss reached the chart
            assert done["status"].startswith("done · saved loras/esd/ESD_van_gogh_")
            # previews before training, at 4, 8, 12, and the final image, through ComfyUI's preview channel
            page.wait_for_function("window.esdSeen.executed !== null && window.esdSeen.previews >= 5",
                                   timeout=60_000)
            seen = page.evaluate("window.esdSeen")
            assert seen["previews"] == 5, seen
            assert seen["executed"]["images"][0]["type"] == "temp"  # the final image, a temp-folder preview
            if not vue_nodes:
                page.wait_for_function(f"({VIEW_JS})('{node_id}').images_on_node > 0", timeout=30_000)
            else:  # the preview is drawn in the Vue node
                page.wait_for_selector(f"[data-node-id='{node_id}'] img", timeout=30_000)
            assert "esd_live_view" not in done["serialized"] and json.loads(done["serialized"])[0] == \
                "a painting by Van Gogh"  # the chart is no widget value of the saved workflow
            page.wait_for_function("!document.querySelector('.queue-button-group button[aria-label=\"Cancel current "
                                   "run\"]:not([disabled])')", timeout=120_000)  # the whole workflow finished
            shoot(page, artifacts / f"{mode}_done.png")
            fit_view(page)
            shoot(page, artifacts / f"{mode}_done_whole_workflow.png")
            page.evaluate(FOCUS_JS, node_id)

            # a second run, cancelled from the queue while it trains
            page.evaluate(SET_WIDGETS_JS, [{"ESDTrain": {"iterations": 100000, "seed": 1 + int(time.time()) % 100000}},
                                           ckpt])
            page.click("[data-testid='queue-button'] button")
            wait_view(page, node_id, "v.phase === 'training' && v.status.includes('/100000')")
            page.click(".queue-button-group button[aria-label='Cancel current run']")
            cancelled = wait_view(page, node_id, "v.phase === 'cancelled'", timeout_s=60)
            assert cancelled["status"].startswith("cancelled at step ") and cancelled["status"].endswith(
                "/100000, nothing saved")
            shoot(page, artifacts / f"{mode}_cancelled.png")
        except Exception:
            shoot(page, artifacts / f"{mode}_failure.png")
            print("\n".join(page.console_messages[-40:]))
            raise
    timings[f"browser test, {mode} (s)"] = f"{time.monotonic() - t0:.0f}"


def test_node_help_pages_open_in_the_docs_panel(comfy_server, artifacts):
    """Every node of the pack has a help page; the frontend's node docs panel shows ESD Erase Concept's."""
    pack = {name for name, node in comfy_server.object_info().items()
            if node["python_module"].startswith("custom_nodes.esd_concept_erasure")}
    docs = {p.stem for p in (ROOT / "web" / "docs").glob("*.md")}
    assert pack and pack == docs
    with chromium() as browser:
        page = open_comfy(browser, comfy_server.url)
        load_workflow_file(page, WORKFLOW)
        node_id = esd_node_id(page)
        page.evaluate(FOCUS_JS, node_id)
        page.evaluate("id => window.app.canvas.selectNode(window.app.graph.getNodeById(Number(id)))", node_id)
        page.click("[data-testid='info-button']")
        help_page = page.wait_for_selector(".markdown-content h1", timeout=30_000)
        assert help_page.inner_text() == "ESD Erase Concept"
        text = page.inner_text(".markdown-content")
        assert "preview_every" in text and "ESD-u" in text and "SDXL" in text
        shoot(page, artifacts / "node_help.png")
