"""Measurements inside ComfyUI's own model code, run in a subprocess (ComfyUI's global state never enters pytest).

    python comfy_probe.py --comfy DIR --pack DIR --checkpoint FILE --probe checkpointing

loads the checkpoint as CheckpointLoaderSimple does, wraps it in the pack's ComfyUI adapter (the pack imported as a
package, as the server imports it) and prints one JSON object with what the probe measured. Tests call `run_probe`.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PACK = "esd_concept_erasure"


def run_probe(probe: str, checkpoint: Path, comfy_dir: Path, pack_dir: Path, timeout: float = 600) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, "--comfy", str(comfy_dir), "--pack", str(pack_dir),
                           "--checkpoint", str(checkpoint), "--probe", probe],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {probe} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _import(comfy_dir: str, pack_dir: str):
    sys.path.insert(0, comfy_dir)
    saved, sys.argv = sys.argv, [sys.argv[0]]
    from comfy.cli_args import args
    args.cpu = True  # must precede comfy.model_management on a machine without CUDA
    import comfy.model_management  # noqa: F401
    sys.argv = saved
    links = tempfile.mkdtemp()
    os.symlink(pack_dir, os.path.join(links, PACK))
    sys.path.insert(0, links)
    import importlib
    return importlib.import_module(f"{PACK}.nodes.comfy_model"), importlib.import_module(f"{PACK}.esd_core.memory")


def probe_checkpointing(comfy_model, memory, checkpoint: str) -> dict:
    """Which units ComfyUI's UNet gets, how often each runs in one training pass with and without gradient
    checkpointing, and the bytes autograd saves for backward in each case."""
    import comfy.sd
    import torch

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, output_clip=True)
    with torch.inference_mode(False):
        work = model.clone()
        adapter = comfy_model.ComfyModelAdapter(work, clip, resolution=64)
        cond = adapter.encode_prompts(["a painting"])
        comfy_model.prepare_for_training(work)
        unet = adapter.unet
        units = memory.checkpoint_units(unet)
        calls = {id(u): 0 for u in units}
        for unit in units:
            original = unit.forward

            def counted(*args, _original=original, _key=id(unit), **kwargs):
                calls[_key] += 1
                return _original(*args, **kwargs)

            unit.forward = counted
        for p in unet.parameters():  # inference-mode weights cannot be saved for backward: as the trainer does
            p.requires_grad_(False)
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        def training_pass():
            x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
            x.requires_grad_(True)  # stands in for trained weights: gradients flow through every unit
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = adapter.predict_noise(x, torch.tensor([500]), cond)
            out.square().mean().backward()

        result = {"units": sorted({type(u).__name__ for u in units})}
        for name, enabled in (("plain", False), ("checkpointed", True)):
            for key in calls:
                calls[key] = 0
            saved[0] = 0
            with memory.gradient_checkpointing(units, enabled=enabled):
                training_pass()
            result[name] = {"calls": sorted(set(calls.values())), "saved_bytes": saved[0],
                            "heavy_calls": sorted({calls[id(u)] for u in units
                                                   if type(u).__name__ in ("ResBlock", "SpatialTransformer")})}
    return result


PROBES = {"checkpointing": probe_checkpointing}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfy", required=True)
    parser.add_argument("--pack", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--probe", choices=sorted(PROBES), required=True)
    a = parser.parse_args()
    comfy_model, memory = _import(a.comfy, a.pack)
    print(json.dumps(PROBES[a.probe](comfy_model, memory, a.checkpoint)))
