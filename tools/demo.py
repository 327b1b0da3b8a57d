"""`make demo`: erase a concept from an embedded tiny model with the command line, offline, in about a minute.

Until the project's trained toy model exists, the embedded default is a tiny random Stable Diffusion pipeline built
from a config (it knows no concepts, so this demo shows the workflow and the file, not erasure quality).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esd_core.cli import main  # noqa: E402
from esd_core.testing import TinyPipelineSpec, save_tiny_pipeline  # noqa: E402


def run() -> int:
    demo = ROOT / ".demo"
    model = demo / "tiny_sd"
    if not model.exists():
        print(f"building a tiny random Stable Diffusion pipeline in {model}")
        save_tiny_pipeline(model, TinyPipelineSpec(seed=0))
    out = demo / f"erased-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"
    code = main(["erase", "--model", str(model), "--concept", "a painting by Van Gogh", "--method", "esd-x",
                 "--iterations", "30", "--ddim-steps", "10", "--out", str(out)])
    if code == 0:
        main(["info", str(out)])
    return code


if __name__ == "__main__":
    sys.exit(run())
