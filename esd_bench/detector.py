"""The automatic judge: a small CNN with one classification head per world attribute.

Trained on clean rendered world images (with mild blur/noise/contrast augmentation, so that slightly soft
generated images are judged like clean ones). ``classify`` returns, for every image, the predicted value of each
attribute; ``esd_bench.evaluate`` turns those into rates.

CLI: ``python -m esd_bench.detector --out esd_bench/assets --seed 0`` trains and saves
``detector.safetensors`` + ``detector.json`` (config and held-out accuracy).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import DETECTOR_CONFIG_PATH, DETECTOR_PATH, world

log = logging.getLogger(__name__)


@dataclass
class DetectorConfig:
    """Architecture and training settings; saved next to the weights."""

    channels: tuple[int, ...] = (16, 32, 64, 96)
    attributes: dict[str, list[str]] = field(default_factory=lambda: {a: list(v) for a, v in world.ATTRIBUTES.items()})
    image_size: int = world.IMAGE_SIZE
    # training
    seed: int = 0
    train_images: int = 12000
    heldout_images: int = 2000
    steps: int = 1000
    batch_size: int = 48
    lr: float = 2e-3


class AttributeDetector(nn.Module):
    """Strided conv trunk + global average pool + one linear head per attribute."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.config = config
        # Downsample first, then refine at each scale: cheap on one CPU thread, and 2 px features are still
        # fine enough for the smallest pattern (dots ~3 px wide).
        layers: list[nn.Module] = []
        c_in = 3
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({a: nn.Linear(c_in, len(v)) for a, v in config.attributes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: float (N, 3, H, W) in [0, 1] -> logits per attribute."""
        h = self.trunk(x * 2 - 1).mean(dim=(2, 3))
        return {a: head(h) for a, head in self.heads.items()}


def to_tensor(images: Any) -> torch.Tensor:
    """Images as float (N, 3, 64, 64) in [0, 1].

    Accepts a uint8 numpy array (N, H, W, 3), a float numpy array (N, H, W, 3) in [0, 1] (diffusers'
    ``output_type="np"``), a float tensor (N, 3, H, W) in [0, 1], or a sequence of PIL images.
    """
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
    else:
        if not isinstance(images, np.ndarray):
            images = np.stack([np.asarray(im.convert("RGB")) for im in images])
        arr = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
        x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    if x.shape[-1] != world.IMAGE_SIZE or x.shape[-2] != world.IMAGE_SIZE:
        x = F.interpolate(x, size=(world.IMAGE_SIZE, world.IMAGE_SIZE), mode="area")
    return x.clamp(0, 1).contiguous()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild blur, noise and contrast changes: what a VAE decoder does to an image, without changing its labels."""
    n = x.shape[0]
    sigma = torch.rand(n, generator=gen) * 1.2
    k = torch.arange(-2, 3, dtype=torch.float32)
    kernels = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)  # (n, 5) separable Gaussian per image
    pad = F.pad(x, (2, 2, 2, 2), mode="replicate")
    rows = sum(kernels[:, i, None, None, None] * pad[:, :, :, i:i + x.shape[-1]] for i in range(5))
    x = sum(kernels[:, i, None, None, None] * rows[:, :, i:i + x.shape[-2], :] for i in range(5))
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.3
    brightness = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.1
    x = (x - 0.5) * contrast + 0.5 + brightness
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.04
    return x.clamp(0, 1)


def accuracy(model: AttributeDetector, images: np.ndarray, labels: np.ndarray, batch: int = 256) -> dict[str, float]:
    """Per-attribute accuracy on uint8 images with label indices in ``world.ATTRIBUTE_NAMES`` order."""
    preds = predict_indices(model, images, batch)
    return {a: float((preds[a] == labels[:, i]).mean()) for i, a in enumerate(model.config.attributes)}


@torch.no_grad()
def predict_indices(model: AttributeDetector, images: Any, batch: int = 256) -> dict[str, np.ndarray]:
    """Predicted class index per attribute for each image."""
    model.eval()
    x = to_tensor(images)
    out: dict[str, list[np.ndarray]] = {a: [] for a in model.config.attributes}
    for i in range(0, len(x), batch):
        for a, logits in model(x[i:i + batch]).items():
            out[a].append(logits.argmax(dim=1).numpy())
    return {a: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for a, v in out.items()}


def train(config: DetectorConfig) -> tuple[AttributeDetector, dict[str, float]]:
    """Train a detector on freshly rendered images; returns it and its held-out accuracy per attribute."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    t0 = time.time()
    images, labels, _ = world.make_dataset(seed=config.seed + 101, n=config.train_images)
    held_images, held_labels, _ = world.make_dataset(seed=config.seed + 202, n=config.heldout_images)
    log.info("rendered %d train + %d held-out images in %.0fs", len(images), len(held_images), time.time() - t0)
    x_all = to_tensor(images)
    y_all = torch.from_numpy(labels)
    model = AttributeDetector(config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / config.steps)))
    model.train()
    for step in range(config.steps):
        idx = torch.randint(0, len(x_all), (config.batch_size,), generator=gen)
        x = _augment(x_all[idx], gen)
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5, x, x.flip(-1))  # labels are flip-invariant
        logits = model(x)
        loss = sum(F.cross_entropy(logits[a], y_all[idx, i]) for i, a in enumerate(config.attributes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == config.steps - 1:
            log.info("step %d/%d loss %.4f (%.0fs)", step, config.steps, loss.item(), time.time() - t0)
    acc = accuracy(model, held_images, held_labels)
    log.info("held-out accuracy %s", acc)
    return model, acc


def save(model: AttributeDetector, heldout_accuracy: dict[str, float], out_dir: Path) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / DETECTOR_PATH.name))
    meta = {"config": asdict(model.config), "heldout_accuracy": heldout_accuracy}
    (out_dir / DETECTOR_CONFIG_PATH.name).write_text(json.dumps(meta, indent=2) + "\n")


def load(weights: Path = DETECTOR_PATH, config_path: Path = DETECTOR_CONFIG_PATH) -> AttributeDetector:
    """Load the committed detector (float32, eval mode)."""
    from safetensors.torch import load_file

    meta = json.loads(Path(config_path).read_text())
    cfg = meta["config"]
    cfg["channels"] = tuple(cfg["channels"])
    model = AttributeDetector(DetectorConfig(**cfg))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    model.load_state_dict(state)
    return model.eval()


_DEFAULT: AttributeDetector | None = None


def default_detector() -> AttributeDetector:
    """The committed detector, loaded once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load()
    return _DEFAULT


def classify(images: Any, model: AttributeDetector | None = None) -> dict[str, list[str]]:
    """Predicted attribute values: ``{"shape": ["circle", ...], "color": [...], "style": [...]}``.

    ``images``: see ``to_tensor`` (uint8 HWC numpy, float HWC numpy in [0, 1], float NCHW tensor in [0, 1], PIL list).
    """
    model = model or default_detector()
    idx = predict_indices(model, images)
    return {a: [model.config.attributes[a][i] for i in idx[a]] for a in model.config.attributes}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DETECTOR_PATH.parent)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DetectorConfig.steps)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    model, acc = train(DetectorConfig(seed=args.seed, steps=args.steps))
    save(model, acc, args.out)
    print(json.dumps({"heldout_accuracy": acc}))


if __name__ == "__main__":
    main()
