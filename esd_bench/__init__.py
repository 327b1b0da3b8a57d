"""esd_bench: a small, really trained text-to-image world for measuring concept erasure on CPU.

Submodules (import them explicitly; this package imports nothing heavy):

* ``esd_bench.world``     -- the synthetic world: attributes, rendering, captions, datasets
* ``esd_bench.detector``  -- per-attribute CNN detector (the automatic judge)
* ``esd_bench.train_toy`` -- trains the toy Stable-Diffusion-layout pipeline (VAE, CLIP text encoder, UNet)
* ``esd_bench.evaluate``  -- generate with a pipeline and measure attribute rates with the detector
"""
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TOY_SD_DIR = ASSETS_DIR / "toy_sd"
DETECTOR_PATH = ASSETS_DIR / "detector.safetensors"
DETECTOR_CONFIG_PATH = ASSETS_DIR / "detector.json"

__all__ = ["ASSETS_DIR", "TOY_SD_DIR", "DETECTOR_PATH", "DETECTOR_CONFIG_PATH"]
