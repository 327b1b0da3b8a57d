"""Issue 10's proof in the real hosts: every file kind the pack writes, placed in the host's Lora folder, applies
through ``<lora:name:1>`` in txt2img (the image differs from the base, ``<lora:name:0>`` equals it) with no LoRA loading
error in the host's log. The old v1 form fails in A1111 (the bug the v2 keys fix) and loads in Forge.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from erasure_files import FILE_KINDS, attn2_weights, random_diffs, write_all
from webui_checkpoint import ATTN2_MODULES, cached_checkpoint

PROMPT = "a photo of a cat"
# What either host prints when a LoRA/diff file (or one of its layers) does not load.
LOAD_ERRORS = re.compile(r"Could not find a module type|loading network|Failed to load network|Lora not found|"
                         r"Couldn't find network|unmatched keys|version mismatch|Mismatch|SHAPE MISMATCH|"
                         r"^ERROR |patch type not recognized|Traceback", re.MULTILINE)


@pytest.fixture(scope="session")
def placed(webui):
    """Write every file kind into the host's Lora folder and refresh its list; kind -> name, plus the base image."""
    diffs = random_diffs(attn2_weights(cached_checkpoint(), ATTN2_MODULES))
    names = write_all(webui.loras_dir, diffs)
    webui.refresh_loras()
    base, _ = webui.txt2img(PROMPT)
    # layers each kind changes: every weight and bias (diffs), or every weight (LoRA; biases have none)
    layers = {kind: sum(1 for d in diffs.values() if d.ndim == 2) if kind == "lora" else len(diffs) for kind in names}
    return names, base, layers


def test_the_host_lists_every_file(webui, placed):
    names, _, _ = placed
    listed = {entry["name"] for entry in webui.loras()}
    assert set(names.values()) <= listed, f"missing from /sdapi/v1/loras: {set(names.values()) - listed}"


def _differs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_file_kind_applies_through_the_lora_tag(webui, placed, kind):
    names, base, layers = placed
    loads_here = FILE_KINDS[kind] or webui.host.name == "forge"
    mark = webui.log_size()
    strong, info = webui.txt2img(f"{PROMPT} <lora:{names[kind]}:1>")
    zero, _ = webui.txt2img(f"{PROMPT} <lora:{names[kind]}:0>")
    log = webui.log_since(mark)
    notes = str(info.get("extra_generation_params", {}))

    if not loads_here:  # A1111 files every v1 key under `diffusion_model` (the whole UNet) and skips the network
        assert "Could not find a module type" in log, log[-3000:]
        assert np.array_equal(strong, base), "a v1 file that A1111 refuses still changed the image"
        return
    assert not LOAD_ERRORS.search(log), f"LoRA loading error in the {webui.host.title} log:\n{log[-3000:]}"
    assert "Networks with errors" not in notes, notes
    assert _differs(strong, base) > 1.0, f"<lora:{names[kind]}:1> left the image (almost) as the base"
    if kind == "v2_bf16" and webui.host.name == "a1111":
        # A1111 adds a diff in the file's dtype (networks.py: `weight.to(dtype=updown.dtype) + updown`), so a bf16
        # file rounds the base weights of its layers to bf16 even at strength 0: the base within one level.
        assert np.abs(zero.astype(np.int16) - base).max() <= 2 and _differs(zero, base) < 0.1
    else:
        assert np.array_equal(zero, base), f"<lora:{names[kind]}:0> is not the base image"
    if webui.host.name == "forge":  # Forge counts what it patched: every layer of the file, none skipped
        assert re.search(rf"\[LORA\] Loaded .*{names[kind]}.* with {layers[kind]} keys at weight 1\.0 \(skipped 0 keys\)",
                         log), log[-3000:]
