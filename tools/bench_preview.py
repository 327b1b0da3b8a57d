"""What ESD Erase Concept's live preview (preview_every) costs, measured in the real ComfyUI host.

Trains the same erasure twice (same seed, the VAE wired), without previews and with one every EVERY iterations, and
prints the seconds per iteration, the extra seconds per preview and their ratio. The time is the node's own, from
its first live-view message to its last (model loading is the same in both runs: the second loads from cache).

    .venv/bin/python tools/bench_preview.py [--checkpoint FILE] [--iterations 6] [--every 3] [--ddim-steps 50]
                                            [--resolution 128] [--concept "a striped background"]

Default checkpoint: the project's toy embedded in SD1.5 shapes (esd_bench/comfy_toy.py; the copy the host tests
cache, else built into a temporary folder). One torch thread (OMP_NUM_THREADS, default 1); on a shared machine the
figures are noisy: re-run on a quiet one.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "host"))
sys.path.insert(0, str(ROOT))
from comfy_server import ComfyServer  # noqa: E402


def toy_checkpoint(folder: Path) -> Path:
    cached = sorted((ROOT / ".comfyhost" / "cache" / "checkpoints").glob("esd_toy_sd15-*.safetensors"))
    if cached:
        return cached[-1]
    from esd_bench import comfy_toy

    out = folder / "esd_toy_sd15.safetensors"
    comfy_toy.build_checkpoint(out)
    return out


def timed_run(server: ComfyServer, ckpt: str, args, preview_every: int, prefix: str) -> tuple[float, int]:
    """(seconds from the node's first live message to its last, previews received)."""
    listener = server.listen()
    train = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "concept": args.concept, "method": "esd-x",
             "negative_guidance": 1.0, "start_guidance": 3.0, "iterations": args.iterations, "learning_rate": 1e-5,
             "ddim_steps": args.ddim_steps, "resolution": args.resolution, "seed": 0, "filename_prefix": prefix,
             "sample_with": "trained", "preview_every": preview_every}
    prompt = {"1": {"class_type": "LoadFrozenUNet", "inputs": {"ckpt_name": ckpt}},
              "2": {"class_type": "ESDTrain", "inputs": train}}
    entry = server.run(prompt, timeout=24 * 3600, client_id=listener.client_id)
    time.sleep(0.5)
    listener.close()
    if entry["status"]["status_str"] != "success":
        raise SystemExit(f"run failed: {entry['status']['messages']}")
    times = [t for t, m in zip(listener.received, listener.messages) if m["type"] == "esd.progress"]
    previews = sum(1 for f in listener.binary if f[:4] == b"\x00\x00\x00\x01") - 1  # minus the final loss image
    return times[-1] - times[0], previews


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--resolution", type=int, default=128, help="ESDTrain's resolution (the toy's native: 128)")
    ap.add_argument("--concept", default="a striped background")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="esd-bench-preview-") as tmp:
        ckpt = args.checkpoint or toy_checkpoint(Path(tmp))
        server = ComfyServer(Path(tmp) / "host")
        server.start()
        try:
            (server.checkpoints_dir / ckpt.name).symlink_to(ckpt.resolve())
            timed_run(server, ckpt.name, argparse.Namespace(**{**vars(args), "iterations": 1}), 0, "warmup")
            plain, _ = timed_run(server, ckpt.name, args, 0, "plain")
            with_previews, previews = timed_run(server, ckpt.name, args, args.every, "previews")
        finally:
            server.stop()
    per_iteration = plain / args.iterations
    per_preview = (with_previews - plain) / previews
    print(f"checkpoint {ckpt.name}, resolution {args.resolution}, DDIM {args.ddim_steps}, "
          f"{args.iterations} iterations, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(f"without previews: {plain:.1f} s, {per_iteration:.2f} s per iteration")
    print(f"with a preview every {args.every}: {with_previews:.1f} s, {previews} previews, "
          f"{per_preview:.2f} s per preview = {per_preview / per_iteration:.2f} iterations")


if __name__ == "__main__":
    main()
