"""Bad and hostile inputs for the pack's nodes, sent through the REAL ComfyUI host's HTTP API, with the message the user
sees for each; used by tests/host/test_hardening.py and by ``python tools/hostile_inputs.py`` (the README's table).

Every case is one prompt. Around each, the host's folders are compared: a file that was there and changed or went
away is *lost*, a new file anywhere but loras/esd, checkpoints/esd and output is *outside*. A host that stops
answering is restarted and counted.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from checkpoints import ensure_checkpoint  # noqa: E402
from comfy_server import ComfyServer  # noqa: E402

TEST_NODES = HERE / "esd_test_nodes"
#: where new files may appear (relative to the server's work dir)
ALLOWED = ("models/loras/esd/", "models/checkpoints/esd/", "output/", "temp/", "user/", "comfyui.log",
           "extra_model_paths.yaml")
FAMILIES = ("sd15", "sd15_alt", "sd2v", "ip2p")


def start_server(workdir: Path, comfy_dir: Path) -> ComfyServer:
    """A host with the pack and the test-only nodes (tests/host/esd_test_nodes) and the tiny checkpoints."""
    server = ComfyServer(workdir, comfy_dir=comfy_dir)
    server.custom_nodes_dir.mkdir(parents=True, exist_ok=True)
    link = server.custom_nodes_dir / "esd_test_nodes"
    if not link.exists():
        link.symlink_to(TEST_NODES, target_is_directory=True)
    server.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    for family in FAMILIES:
        target = server.checkpoints_dir / f"tiny_{family}.safetensors"
        if not target.exists():
            target.symlink_to(ensure_checkpoint(family, comfy_dir=comfy_dir))
    return server.start()


# ------------------------------------------------------------------ prompt pieces

SD15 = "tiny_sd15.safetensors"
TRAIN = {"concept": "a painting by Van Gogh", "method": "esd-x", "negative_guidance": 1.0, "start_guidance": 3.0,
         "iterations": 2, "learning_rate": 1e-4, "ddim_steps": 4, "resolution": 64, "seed": 0,
         "filename_prefix": "hostile", "sample_with": "trained"}


def train(ckpt: str = SD15, model=None, **inputs) -> dict:
    loader = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    return loader | {"2": {"class_type": "ESDTrain", "inputs": {
        "model": model or ["1", 0], "clip": ["1", 1], **TRAIN, **inputs}}}


def apply(name: str, ckpt: str = SD15, strength=1.0, loader: str = "CheckpointLoaderSimple") -> dict:
    """Load, apply, sample one step and preview (an output node, so the prompt runs)."""
    return {"1": {"class_type": loader, "inputs": {"ckpt_name": ckpt}},
            "2": {"class_type": "ApplyErasedWeights", "inputs": {"model": ["1", 0], "strength": strength,
                                                                 "erased_weights": name}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["1", 1]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                       "latent_image": ["4", 0], "seed": 0, "steps": 1, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "normal",
                                                       "denoise": 1.0}},
            "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
            "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}}


def export(name: str = "esd/hostile_base_00001_.safetensors", **inputs) -> dict:
    return {"1": {"class_type": "ExportErasureLoRA", "inputs": {
        "erased_weights": name, "keep": "rank", "rank": 2, "energy": 0.9, "save_dtype": "fp16",
        "filename_prefix": "hostile_lora", **inputs}}}


def save_checkpoint(prefix: str) -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
            "2": {"class_type": "SaveErasedCheckpoint", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                                   "vae": ["1", 2], "filename_prefix": prefix}}}


# ------------------------------------------------------------------ files the cases use

BASE_FILE = "esd/hostile_base_00001_.safetensors"


class _Planted:
    """Unpickling this creates a marker file: a stand-in for code hidden in a pickle checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def prepare(server: ComfyServer) -> None:
    """One real erasure to damage and misuse, hostile files beside it, a symlink out of loras/esd."""
    esd = server.loras_dir / "esd"
    if not (server.loras_dir / BASE_FILE).exists():
        entry = server.run(train(filename_prefix="hostile_base"), timeout=600)
        assert entry["status"]["status_str"] == "success", entry["status"]
    good = (server.loras_dir / BASE_FILE).read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    header, rest = json.loads(good[8:8 + n]), good[8 + n:]

    def with_header(h: dict) -> bytes:
        raw = json.dumps(h).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + rest

    other_format = json.loads(json.dumps(header))
    other_format["__metadata__"]["esd.format"] = "kohya-lora"
    unexpected_key = json.loads(json.dumps(header))
    first = next(k for k in unexpected_key if k != "__metadata__")
    unexpected_key["model.diffusion_model.input_blocks.0.0.weight"] = unexpected_key.pop(first)
    int_tensor = json.loads(json.dumps(header))
    entry = int_tensor[first]
    start, end = entry["data_offsets"]
    int_tensor[first] = {"dtype": "I16", "shape": entry["shape"], "data_offsets": [start, end]}
    nested = json.loads(json.dumps(header))
    nested["__metadata__"]["esd.hyperparameters"] = "[" * 100000 + "]" * 100000
    files = {"zeros.safetensors": b"\x00" * 100, "truncated.safetensors": good[: len(good) // 2],
             "random.safetensors": os.urandom(4096), "other_format.safetensors": with_header(other_format),
             "unexpected_key.safetensors": with_header(unexpected_key), "int16.safetensors": with_header(int_tensor),
             "nested_json.safetensors": with_header(nested),
             "huge_header_length.safetensors": struct.pack("<Q", 2**62) + good[8:],
             "pickle.safetensors": pickle.dumps(_Planted(str(server.workdir / "pickle_code_ran")))}
    for name, data in files.items():
        (esd / name).write_bytes(data)
    (server.checkpoints_dir / "pickled.ckpt").write_bytes(pickle.dumps(_Planted(str(server.workdir / "ckpt_code_ran"))))
    outside = server.workdir / "outside"
    outside.mkdir(exist_ok=True)
    if not (esd / "link").exists():
        (esd / "link").symlink_to(outside, target_is_directory=True)


# ------------------------------------------------------------------ the cases

@dataclass(frozen=True)
class Case:
    node: str
    what: str
    prompt: Callable[[ComfyServer], dict]
    expect: str          # a fragment of what the user must see
    outcome: str = "refused"  # "refused": an error; "warning": runs and warns; "runs": accepted (see `what`)


NAN, INF = float("nan"), float("inf")
T, A, X, L, S = "ESD Erase Concept", "ESD Apply Erased Weights", "ESD Export LoRA", "ESD Load Frozen UNet", \
    "ESD Save Erased Checkpoint"
CASES = [
    Case(T, "empty concept", lambda s: train(concept=""), "no concept given"),
    Case(T, "whitespace concept", lambda s: train(concept="  \n\t \n"), "no concept given"),
    Case(T, "2000 concepts", lambda s: train(concept="\n".join(f"concept {i}" for i in range(2000))),
         "2000 concepts given; at most 1000"),
    Case(T, "a concept of 5000 characters", lambda s: train(concept="a" * 5000), "5000 characters long"),
    Case(T, "a NUL byte in the concept", lambda s: train(concept="a cat\x00"), "control character"),
    Case(T, "a lone surrogate in the concept", lambda s: train(concept="a \ud800 cat"), "control character"),
    Case(T, "unknown method", lambda s: train(method="esd-q"), "esd-q"),
    Case(T, "method of another type", lambda s: train(method=7), "method"),
    Case(T, "negative_guidance NaN", lambda s: train(negative_guidance=NAN), "negative guidance must be a number"),
    Case(T, "negative_guidance Infinity", lambda s: train(negative_guidance=INF), "negative_guidance"),
    Case(T, "negative_guidance -1", lambda s: train(negative_guidance=-1.0), "negative_guidance"),
    Case(T, "start_guidance NaN", lambda s: train(start_guidance=NAN), "start guidance must be a number"),
    Case(T, "learning_rate NaN", lambda s: train(learning_rate=NAN), "learning rate must be a number"),
    Case(T, "learning_rate Infinity", lambda s: train(learning_rate=INF), "learning_rate"),
    Case(T, "learning_rate 0", lambda s: train(learning_rate=0.0), "learning_rate"),
    Case(T, "iterations 0", lambda s: train(iterations=0), "iterations"),
    Case(T, "iterations 10^12", lambda s: train(iterations=10**12), "iterations"),
    Case(T, "iterations as text", lambda s: train(iterations="many"), "iterations"),
    Case(T, "ddim_steps 1000 (past SD's 1000-step schedule)", lambda s: train(ddim_steps=1000), "ddim_steps"),
    Case(T, "resolution 100 (not a multiple of 8)", lambda s: train(resolution=100), "multiple of 8"),
    Case(T, "resolution -64", lambda s: train(resolution=-64), "resolution"),
    Case(T, "seed -1", lambda s: train(seed=-1), "seed"),
    Case(T, "erase_from with 3 lines for 2 concepts", lambda s: train(concept="a\nb", erase_from="x\ny\nz"),
         "erase_from has 3 entries for 2 concepts"),
    Case(T, "lora_rank 10^6", lambda s: train(lora_rank=10**6), "lora_rank"),
    Case(T, "training_dtype fp64", lambda s: train(training_dtype="fp64"), "training_dtype must be one of"),
    Case(T, "save_dtype int8", lambda s: train(save_dtype="int8"), "save dtype 'int8' is not one of"),
    Case(T, "optimizer sgd", lambda s: train(optimizer="sgd"), "optimizer must be one of"),
    Case(T, "filename_prefix ../../../escape", lambda s: train(filename_prefix="../../../escape"),
         "names cannot leave or skip folders"),
    Case(T, "filename_prefix absolute path", lambda s: train(filename_prefix=f"{s.workdir}/outside/abs"),
         "is an absolute path"),
    Case(T, "filename_prefix through a symlink out of loras/esd", lambda s: train(filename_prefix="link/escape"),
         "leads outside"),
    Case(T, "filename_prefix CON (reserved on Windows)", lambda s: train(filename_prefix="CON"),
         "a name Windows reserves"),
    Case(T, "filename_prefix with a colon", lambda s: train(filename_prefix="a:b"), "cannot hold on every system"),
    Case(T, "filename_prefix of 300 characters", lambda s: train(filename_prefix="x" * 300), "300 characters long"),
    Case(T, "filename_prefix empty", lambda s: train(filename_prefix="  "), "the file name is empty"),
    Case(T, "a model of an unsupported family (InstructPix2Pix)", lambda s: train(ckpt="tiny_ip2p.safetensors"),
         "supports Stable Diffusion 1.x, 2.x and SDXL"),
    Case(T, "resume with a checkpoint of other settings",
         lambda s: _other_run_checkpoint(s) or train(filename_prefix="resumed", resume=True, checkpoint_every=1,
                                                     seed=5),
         "seed=4 (this run: 5)"),
    Case(T, "weights stored in fp8 (e4m3fn)", lambda s: train(model=["9", 0]) | {"9": {
        "class_type": "ESDTestFp8Model", "inputs": {"ckpt_name": SD15}}},
         "saved loras/esd/hostile_", "runs"),
    Case(A, "strength NaN", lambda s: apply(BASE_FILE, strength=NAN), "strength must be a number in [-10, 10]"),
    Case(A, "strength Infinity", lambda s: apply(BASE_FILE, strength=INF), "strength"),
    Case(A, "no file chosen, nothing connected", lambda s: apply("(none)"), "no erased weights chosen"),
    Case(A, "a file name outside loras/esd", lambda s: apply("../../etc/passwd"), "is not a file in loras/esd"),
    Case(A, "a file of zeros", lambda s: apply("esd/zeros.safetensors"), "damaged"),
    Case(A, "a truncated file", lambda s: apply("esd/truncated.safetensors"), "damaged"),
    Case(A, "random bytes", lambda s: apply("esd/random.safetensors"), "damaged"),
    Case(A, "a header length of 2^62", lambda s: apply("esd/huge_header_length.safetensors"), "damaged"),
    Case(A, "a header claiming another format", lambda s: apply("esd/other_format.safetensors"),
         "is not an ESD erased-weights file"),
    Case(A, "a tensor under an unexpected key", lambda s: apply("esd/unexpected_key.safetensors"),
         "unexpected tensor"),
    Case(A, "an int16 tensor", lambda s: apply("esd/int16.safetensors"), "not one of the dtypes this format stores"),
    Case(A, "header JSON nested 100000 deep", lambda s: apply("esd/nested_json.safetensors"), "damaged ESD header"),
    Case(A, "a pickle named .safetensors (code planted)", lambda s: apply("esd/pickle.safetensors"),
         "never unpickles"),
    Case(A, "erased weights for another architecture (SD2)", lambda s: apply(BASE_FILE, ckpt="tiny_sd2v.safetensors"),
         "made for a sd1 model"),
    Case(A, "erased weights for another base model", lambda s: apply(BASE_FILE, ckpt="tiny_sd15_alt.safetensors"),
         "weights differ from the base", "warning"),
    Case(X, "energy NaN", lambda s: export(keep="energy", energy=NAN), "energy"),
    Case(X, "rank 4096 (larger than any layer allows)", lambda s: export(rank=4096), "larger than"),
    Case(X, "a damaged source file", lambda s: export("esd/truncated.safetensors"), "damaged"),
    Case(X, "filename_prefix ../escape", lambda s: export(filename_prefix="../escape"), "cannot leave"),
    Case(L, "a pickle checkpoint (.ckpt, code planted)",
         lambda s: apply(BASE_FILE, ckpt="pickled.ckpt", loader="LoadFrozenUNet"), "never unpickles"),
    Case(L, "a checkpoint name not in the list",
         lambda s: apply(BASE_FILE, ckpt="../../x.safetensors", loader="LoadFrozenUNet"),
         "is not a file in the checkpoints folder"),
    Case(S, "filename_prefix ../../escape", lambda s: save_checkpoint("../../escape"), "cannot leave"),
    Case(S, "filename_prefix nul.txt", lambda s: save_checkpoint("nul.txt"), "a name Windows reserves"),
]


def _other_run_checkpoint(server: ComfyServer) -> None:
    """The resumable checkpoint of a cancelled run of prefix 'resumed' with seed 4 (a real run, cancelled once its
    first checkpoint is written)."""
    path = server.loras_dir / "esd" / "resumed.esd-resume"
    if path.exists():
        return None
    prompt_id = server.queue(train(filename_prefix="resumed", checkpoint_every=1, seed=4, iterations=100000))
    deadline = time.monotonic() + 600
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    server.interrupt()
    server.wait(prompt_id, timeout=300)
    assert path.exists(), "the cancelled run kept no checkpoint"
    return None


@dataclass
class Result:
    case: Case
    where: str      # "ComfyUI's validation" | "the pack" | "ran"
    message: str
    seconds: float
    lost: list[str]
    outside: list[str]
    restarted: bool

    @property
    def ok(self) -> bool:
        shown = self.case.expect in self.message
        ran = self.where == "ran"
        return shown and ran == (self.case.outcome != "refused") and not self.lost and not self.outside


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> content hash of every regular file under ``root`` (symlinks not followed)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            rel = path.relative_to(root).as_posix()
            if rel == "comfyui.log":
                continue
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.stat().st_size < 2**26 else \
                str(path.stat().st_mtime_ns)
    return out


def run_case(server: ComfyServer, case: Case) -> Result:
    prompt = case.prompt(server)
    before = snapshot(server.workdir)
    t0 = time.monotonic()
    status, resp = server.submit(prompt)
    if status == 400:
        errors = [e for node in (resp.get("node_errors") or {}).values() for e in node.get("errors", [])]
        errors = errors or [resp.get("error", {})]
        where, message = "ComfyUI's validation", "; ".join(f"{e.get('message')}: {e.get('details')}" for e in errors)
    else:
        entry = server.wait(resp["prompt_id"], timeout=600)
        messages = entry["status"]["messages"]
        failure = [d for t, d in messages if t == "execution_error"]
        if failure:
            where, message = "the pack", failure[0]["exception_message"].strip()
        else:
            where = "ran"
            texts = [t for out in entry["outputs"].values() for t in out.get("text", [])]
            message = " / ".join(texts)
    seconds = time.monotonic() - t0
    after = snapshot(server.workdir)
    lost = sorted(k for k, v in before.items() if after.get(k) != v and not k.startswith(("temp/", "user/")))
    outside = sorted(k for k in after.keys() - before.keys() if not k.startswith(ALLOWED))
    for marker in ("pickle_code_ran", "ckpt_code_ran"):
        if (server.workdir / marker).exists():
            outside.append(marker + " (a pickle was unpickled)")
    restarted = not server.alive()
    if restarted:
        server.stop()
        server.start()
    message = message.replace(str(server.workdir), "/path/to/ComfyUI")  # the same table from any temporary folder
    return Result(case, where, message, seconds, lost, outside, restarted)


def run_all(server: ComfyServer, cases=CASES) -> list[Result]:
    prepare(server)
    return [run_case(server, case) for case in cases]


def markdown(results: list[Result]) -> str:
    """The README's table and its totals."""
    def cell(text: str) -> str:
        text = text.replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= 300 else text[:297] + "..."
    rows = ["| # | node | input | stopped by | what the user sees |", "|---:|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        where = {"ran": "runs" if r.case.outcome == "runs" else "runs, warns"}.get(r.where, r.where)
        rows.append(f"| {i} | {r.case.node} | {cell(r.case.what)} | {where} | {cell(r.message)} |")
    restarts = sum(r.restarted for r in results)
    lost = sum(len(r.lost) for r in results)
    outside = sum(len(r.outside) for r in results)
    rows.append("")
    rows.append(f"**{len(results)} inputs tried; server restarts needed: {restarts}; files lost: {lost}; files "
                f"written outside the allowed folders: {outside}; cases whose message or outcome differs from the "
                f"expected: {sum(not r.ok for r in results)}.**")
    return "\n".join(rows)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
