"""Writes the example workflows in workflows/ (ComfyUI's UI format, shown in its template browser).

The workflows are data; this script keeps their links and widget orders consistent. Run it after changing a node's
inputs: `.venv/bin/python tools/build_workflows.py`.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "workflows"

# node type -> (input sockets, output sockets), each (name, type)
SOCKETS = {
    "LoadFrozenUNet": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "ESDTrain": ([("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")],
                 [("model", "MODEL"), ("erased_weights", "ERASED_WEIGHTS"), ("loss", "LOSS_MAP")]),
    "ApplyErasedWeights": ([("model", "MODEL"), ("erased_weights_in", "ERASED_WEIGHTS")], [("MODEL", "MODEL")]),
    "SaveErasedCheckpoint": ([("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")], []),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], []),
    "ImageStitch": ([("image1", "IMAGE"), ("image2", "IMAGE")], [("IMAGE", "IMAGE")]),
    "LossGraphNode": ([("loss", "LOSS_MAP")], []),
    "MarkdownNote": ([], []),
}


def note_text(markdown: str) -> str:
    """One line per paragraph: the frontend's Markdown note drops the space at a line break inside a paragraph."""
    paragraphs = []
    for para in markdown.strip().split("\n\n"):
        lines = [line.strip() for line in para.splitlines()]
        heading = [line for line in lines if line.startswith("#")]
        body = " ".join(line for line in lines if not line.startswith("#"))
        paragraphs.append("\n".join(heading + ([body] if body else [])))
    return "\n\n".join(paragraphs)


class Workflow:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, type_: str, widgets: list, pos: tuple[int, int], size=(320, 180), title: str | None = None) -> dict:
        inputs, outputs = SOCKETS[type_]
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0,
                "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
                "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if title:
            node["title"] = title
        if type_ == "MarkdownNote":
            node["widgets_values"] = [note_text(widgets[0])]
        self.nodes.append(node)
        return node

    def connect(self, src: dict, slot: int, dst: dict, input_name: str) -> None:
        link_id = len(self.links) + 1
        dst_slot = next(i for i, inp in enumerate(dst["inputs"]) if inp["name"] == input_name)
        type_ = src["outputs"][slot]["type"]
        self.links.append([link_id, src["id"], slot, dst["id"], dst_slot, type_])
        src["outputs"][slot]["links"].append(link_id)
        dst["inputs"][dst_slot]["link"] = link_id

    def to_json(self, name: str) -> dict:
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"esd-workflow/{name}")), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def esd_train_widgets(concept: str, method: str, lr: float, prefix: str, iterations: int = 1000,
                      ddim_steps: int = 50, resolution: int = 0) -> list:
    # concept, method, negative_guidance, start_guidance, iterations, learning_rate, ddim_steps, resolution, seed,
    # filename_prefix, sample_with, erase_from, training_dtype, gradient_checkpointing, fast, lora_rank, optimizer,
    # checkpoint_every, resume, save_dtype, preview_every (a live preview every 50 iterations: 1-2% of the run's time)
    return [concept, method, 1.0, 3.0, iterations, lr, ddim_steps, resolution, 0, prefix, "trained", "", "auto", False,
            False, 0, "adam", 0, False, "fp16", 50]


def sampler_chain(wf: Workflow, model, slot: int, clip_node, vae_node, latent, positive, negative, x: int, y: int,
                  seed: int = 42, steps: int = 25, cfg: float = 7.0):
    """KSampler + VAEDecode for one model output; returns the decode node."""
    ks = wf.add("KSampler", [seed, "fixed", steps, cfg, "euler", "normal", 1.0], (x, y), (300, 260))
    wf.connect(model, slot, ks, "model")
    wf.connect(positive, 0, ks, "positive")
    wf.connect(negative, 0, ks, "negative")
    wf.connect(latent, 0, ks, "latent_image")
    dec = wf.add("VAEDecode", [], (x + 330, y + 40), (200, 50))
    wf.connect(ks, 0, dec, "samples")
    wf.connect(vae_node, 2, dec, "vae")
    return dec


def prompts(wf: Workflow, clip_node, text: str, x: int, y: int, size: int = 512, batch: int = 1):
    pos = wf.add("CLIPTextEncode", [text], (x, y), (320, 100), title="prompt")
    neg = wf.add("CLIPTextEncode", [""], (x, y + 140), (320, 80), title="negative prompt")
    wf.connect(clip_node, 1, pos, "clip")
    wf.connect(clip_node, 1, neg, "clip")
    latent = wf.add("EmptyLatentImage", [size, size, batch], (x, y + 260), (320, 110))
    return pos, neg, latent


def erase_and_compare(name: str, note: str, concept: str, method: str, lr: float, prompt: str, prefix: str,
                      checkpoint: str = "v1-5-pruned-emaonly.safetensors", iterations: int = 1000, ddim_steps: int = 50,
                      resolution: int = 0, latent_size: int = 512, batch: int = 1, cfg: float = 7.0) -> dict:
    """Train an erasure, then sample the same seed from the base and the erased model, side by side."""
    wf = Workflow()
    wf.add("MarkdownNote", [note], (20, -300), (700, 260))
    loader = wf.add("LoadFrozenUNet", [checkpoint], (20, 20), (320, 120))
    train = wf.add("ESDTrain", esd_train_widgets(concept, method, lr, prefix, iterations, ddim_steps, resolution),
                   (380, 20), (360, 460))
    wf.connect(loader, 0, train, "model")
    wf.connect(loader, 1, train, "clip")
    wf.connect(loader, 2, train, "vae")  # decodes the live preview (preview_every)
    # left column, below the prompts: ESD Erase Concept grows downwards with its live chart and final image
    loss = wf.add("LossGraphNode", ["esd_loss"], (20, 620), (320, 280))
    wf.connect(train, 2, loss, "loss")
    pos, neg, latent = prompts(wf, loader, prompt, 20, 200, latent_size, batch)
    before = sampler_chain(wf, loader, 0, loader, loader, latent, pos, neg, 780, 20, cfg=cfg)
    after = sampler_chain(wf, train, 0, loader, loader, latent, pos, neg, 780, 320, cfg=cfg)
    stitch = wf.add("ImageStitch", ["right", True, 8, "white"], (1340, 100), (260, 160), title="before | after")
    wf.connect(before, 0, stitch, "image1")
    wf.connect(after, 0, stitch, "image2")
    save = wf.add("SaveImage", [f"{prefix}_before_after"], (1340, 300), (400, 450))
    wf.connect(stitch, 0, save, "images")
    return wf.to_json(name)


def apply_strengths() -> dict:
    wf = Workflow()
    wf.add("MarkdownNote", ["""## Apply saved erased weights at several strengths
Loads an erasure saved by **ESD Erase Concept** (from `models/loras/esd/`) and applies it to the checkpoint it was
trained on at strengths 0, 0.5 and 1, as weight patches (no copy of the model). Strength 0 is the unchanged model,
1 the erasure as trained. The three images share a seed and are stitched left to right.

A file trained on another base model is refused (different shapes) or flagged with a warning (different weights).
The same files also load with the stock **LoraLoaderModelOnly**."""], (20, -300), (700, 240))
    loader = wf.add("CheckpointLoaderSimple", ["v1-5-pruned-emaonly.safetensors"], (20, 20), (320, 120))
    pos, neg, latent = prompts(wf, loader, "a painting of a village at night by Van Gogh", 20, 200)
    decodes = []
    for i, strength in enumerate((0.0, 0.5, 1.0)):
        apply = wf.add("ApplyErasedWeights", ["esd/ESD_van_gogh_00001_.safetensors", strength], (380, 20 + 200 * i),
                       (340, 130), title=f"strength {strength}")
        wf.connect(loader, 0, apply, "model")
        decodes.append(sampler_chain(wf, apply, 0, loader, loader, latent, pos, neg, 760, 20 + 300 * i))
    first = wf.add("ImageStitch", ["right", True, 8, "white"], (1320, 60), (260, 160))
    wf.connect(decodes[0], 0, first, "image1")
    wf.connect(decodes[1], 0, first, "image2")
    second = wf.add("ImageStitch", ["right", True, 8, "white"], (1320, 260), (260, 160))
    wf.connect(first, 0, second, "image1")
    wf.connect(decodes[2], 0, second, "image2")
    save = wf.add("SaveImage", ["ESD_strengths"], (1320, 460), (400, 400))
    wf.connect(second, 0, save, "images")
    return wf.to_json("apply_erased_weights_strengths")


def save_checkpoint() -> dict:
    wf = Workflow()
    wf.add("MarkdownNote", ["""## Save an erased checkpoint
Applies a saved erasure to its base model and writes a full checkpoint (UNet, text encoder, VAE) to
`models/checkpoints/esd/`, with the erasure recorded in the file's header (`esd.erasures`).

Load it back with the stock **Load Checkpoint** node (refresh the list first): it behaves like the erased model
here, in ComfyUI or in any UI that reads Stable Diffusion checkpoints."""], (20, -260), (700, 200))
    loader = wf.add("LoadFrozenUNet", ["v1-5-pruned-emaonly.safetensors"], (20, 20), (320, 120))
    apply = wf.add("ApplyErasedWeights", ["esd/ESD_van_gogh_00001_.safetensors", 1.0], (380, 20), (340, 130))
    wf.connect(loader, 0, apply, "model")
    save = wf.add("SaveErasedCheckpoint", ["ESD_van_gogh", "model"], (760, 20), (340, 130))
    wf.connect(apply, 0, save, "model")
    wf.connect(loader, 1, save, "clip")
    wf.connect(loader, 2, save, "vae")
    return wf.to_json("save_erased_checkpoint")


ARTIST_NOTE = """## Erase an artist's style with ESD-x
**ESD Erase Concept** fine-tunes the cross-attention layers (`esd-x`) so that the prompt *a painting by Van Gogh*
no longer produces his style, while other prompts are left alone. The same seed is then sampled from the frozen
model (left) and the erased model (right). Plot Loss Graph shows the training loss.

Paper defaults: 1000 iterations, learning rate 1e-5, negative guidance 1, start guidance 3, DDIM 50. Use a caption
the model knows, not a bare word. The erasure is saved to `models/loras/esd/` and re-runs only when an input
changes (change the seed to train again). Expect about an hour on a consumer GPU for SD1.5 at 512 px."""

GLOBAL_NOTE = """## Erase a global concept with ESD-u
`esd-u` trains every layer except cross-attention, so the concept is erased whatever the prompt says, e.g. an object
class (*a photo of a church*) or nudity. It changes the model more broadly than `esd-x`, so check unrelated prompts
too. The left image is the frozen model, the right the erased one, from the same seed."""


TOY_NOTE = """## The demo's erasure on the toy model, in ComfyUI
`esd_toy_sd15.safetensors` is the project's small trained text-to-image model (a world of coloured shapes on
patterned backgrounds, see esd_bench/README.md), embedded exactly in Stable Diffusion 1.5 shapes so that ComfyUI
loads it like any SD1.5 checkpoint. Build it with `make comfy` (or `python -m esd_bench.comfy_toy --out
models/checkpoints/esd_toy_sd15.safetensors`).

Its images are 64x64 pixels from 16x16 latents; ComfyUI's latent nodes count 8 pixels per latent, so the
latent size is 128x128 and ESD Erase Concept's resolution 128. **ESD Erase Concept** erases *a striped background*
with `esd-x`, the demo's erasure (`make demo`) at learning rate 5e-5 instead of the demo's 5e-4: every toy weight
is spread over 4-12 copies here, and Adam moves each copy by about the learning rate, so the same rate would act
4-12x larger (esd_bench/embedding_steps.py). Four seeds, each image saved as before | after.

The embedded UNet has 100x the toy's parameters (copies and zeros), so on a CPU an iteration takes ~20 s: use a
GPU, or fewer iterations to see it run. Prompts the toy knows: a shape (circle, square, triangle, star, cross), a
colour (red, green, blue, yellow, purple) and a background (plain, striped, dotted, checkered, gradient), e.g.
*a yellow circle on a striped background*."""


#: The toy workflow's learning rate: the demo's 5e-4 divided by the embedding's step factor (about 10; measured by
#: esd_bench/embedding_steps.py, confirmed in the host by tools/host_erasure.py).
TOY_LEARNING_RATE = 5e-5


def main() -> None:
    OUT.mkdir(exist_ok=True)
    workflows = {
        "esd_x_erase_artist_style": erase_and_compare("esd_x_erase_artist_style", ARTIST_NOTE,
                                                      "a painting by Van Gogh", "esd-x", 1e-5,
                                                      "a painting of a village at night by Van Gogh", "ESD_van_gogh"),
        "esd_u_erase_global_concept": erase_and_compare("esd_u_erase_global_concept", GLOBAL_NOTE,
                                                        "a photo of a church", "esd-u", 1e-5,
                                                        "a photo of a church in a village", "ESD_church"),
        "esd_toy_erase_in_comfyui": erase_and_compare("esd_toy_erase_in_comfyui", TOY_NOTE, "a striped background",
                                                      "esd-x", TOY_LEARNING_RATE,
                                                      "a yellow circle on a striped background",
                                                      "ESD_toy_striped", checkpoint="esd_toy_sd15.safetensors",
                                                      iterations=200, ddim_steps=25, resolution=128,
                                                      latent_size=128, batch=4, cfg=7.5),
        "apply_erased_weights_strengths": apply_strengths(),
        "save_erased_checkpoint": save_checkpoint(),
    }
    for name, data in workflows.items():
        (OUT / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote workflows/{name}.json")


if __name__ == "__main__":
    main()
