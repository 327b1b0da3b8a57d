"""Tiny random-weight checkpoints that ComfyUI's stock CheckpointLoaderSimple detects and loads.

Used two ways:
  * imported by the tests: ``ensure_checkpoint("sd15")`` returns the path of a cached file, building it
    first if needed (in a subprocess, so ComfyUI's global state never leaks into the pytest process);
  * run as a script (that subprocess): ``python checkpoints.py --comfy DIR --family sd15 --out FILE``.

The files are written by ComfyUI's own code path for CheckpointSave (comfy.sd.save_checkpoint), so key
names and text-encoder formats are exactly what a real ComfyUI-saved SD1.5 / SD2 / SDXL file contains.
Only the UNet is shrunk; what detection needs is kept (comfy/model_detection.py detect_unet_config and
comfy/supported_models.py ``unet_config`` of each family):
  * model_channels=320, context_dim and use_linear_in_transformer of the family, adm_in_channels;
  * SD2 v-prediction: SD20.model_type() says V_PREDICTION iff the std of
    ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` > 0.09, so the UNet has 12 output blocks
    with a transformer in the last one, and that bias is drawn with std 0.2;
  * SDXL: ``transformer_depth == [0, 0, 2, 2, 10, 10]`` is matched exactly, so the input side keeps
    SDXL's block structure; channel_mult [1, 1, 1] (instead of [1, 2, 4]) makes it ~8x smaller.
Text encoders cannot shrink: their size comes from json configs inside ComfyUI, not from the weights,
and missing weights would stay uninitialised (torch.empty). The VAE is TAESD (2.4M params), which
ComfyUI detects from its keys, instead of the 83.7M KL VAE; families in KL_VAE_FAMILIES keep SD's KL VAE, because
AUTOMATIC1111 and Forge build the VAE from fixed SD configs and load only matching weights.
Never commit the outputs: they are rebuilt on demand and cached under .comfyhost/cache/checkpoints.
"""
import argparse
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_COMFY = Path(os.environ.get("COMFY_DIR", ROOT / ".comfyhost" / "ComfyUI"))
DEFAULT_CACHE = Path(os.environ.get("ESD_TEST_CACHE", ROOT / ".comfyhost" / "cache" / "checkpoints"))

# Bump when anything below changes what gets written; the cache key is <family>-v<BUILDER_VERSION>.
BUILDER_VERSION = 1

_COMMON = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
           "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False,
           "use_temporal_resblock": False, "use_temporal_attention": False}

# family -> (supported_models class name, expected model_type name, unet config).
# Note: transformer_depth_output is ordered from the LAST output block to output_blocks.0 (UNetModel
# pop()s it from the end; detect_unet_config fills it walking input blocks upward), and an ADM UNet
# needs num_classes="sequential" for label_emb to exist (detection sets it when label_emb is there).
FAMILIES = {
    # One resolution level, one res block + transformer each side, middle transformer: 25.8M UNet.
    "sd15": ("SD15", "EPS", dict(
        context_dim=768, use_linear_in_transformer=False, adm_in_channels=None,
        channel_mult=[1], num_res_blocks=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
        transformer_depth_middle=1)),
    # The sd15 UNet with SD1.5's KL VAE: what the A1111 and Forge host tests load (A1111 with a sidecar yaml that
    # gives this UNet's shape, tests/webui_host/webui_checkpoint.py).
    "sd15_kl": ("SD15", "EPS", dict(
        context_dim=768, use_linear_in_transformer=False, adm_in_channels=None,
        channel_mult=[1], num_res_blocks=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
        transformer_depth_middle=1)),
    # An SD1.5 UNet with 8 input channels is InstructPix2Pix: a family ESD refuses (for the error-path test).
    "ip2p": ("SD15_instructpix2pix", "EPS", dict(
        in_channels=8, context_dim=768, use_linear_in_transformer=False, adm_in_channels=None,
        channel_mult=[1], num_res_blocks=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
        transformer_depth_middle=1)),
    # The same layout as sd15 from another seed: "another base model" for the base-hash warning test.
    "sd15_alt": ("SD15", "EPS", dict(
        context_dim=768, use_linear_in_transformer=False, adm_in_channels=None,
        channel_mult=[1], num_res_blocks=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
        transformer_depth_middle=1)),
    # SD2's real level structure (4 levels x 2 res blocks -> 12 output blocks, so output_blocks.11
    # exists for the v-prediction heuristic) at 320 channels everywhere. Transformers only where
    # detection needs them (input_blocks.1 gives context_dim/linear proj, output_blocks.11 gives
    # v-pred) plus the middle block: 78.9M UNet. Output res blocks dominate; other layouts are >=78M.
    "sd2v": ("SD20", "V_PREDICTION", dict(
        context_dim=1024, use_linear_in_transformer=True, adm_in_channels=None,
        channel_mult=[1, 1, 1, 1], num_res_blocks=[2, 2, 2, 2],
        transformer_depth=[1, 0, 0, 0, 0, 0, 0, 0], transformer_depth_output=[1] + [0] * 11,
        transformer_depth_middle=1)),
    # SDXL input side as required, one transformer in each output block of the two deep levels and in
    # the middle (so every level a real SDXL has attention in has some here): 154M UNet.
    "sdxl": ("SDXL", "EPS", dict(
        context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
        channel_mult=[1, 1, 1], num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10],
        transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1], transformer_depth_middle=1)),
}

#: Families saved with SD's 83.7M KL VAE (ddconfig of SD1.x/SD2.x) instead of TAESD.
KL_VAE_FAMILIES = {"sd15_kl"}
_SD_KL_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                   "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


# --------------------------------------------------------------------------------------------------
# Test-side API (runs in the pytest process; does not import ComfyUI)
# --------------------------------------------------------------------------------------------------
def checkpoint_path(family, cache_dir=DEFAULT_CACHE):
    return Path(cache_dir) / f"tiny_{family}-v{BUILDER_VERSION}.safetensors"


def ensure_checkpoint(family, cache_dir=DEFAULT_CACHE, comfy_dir=DEFAULT_COMFY, timeout=900):
    """Return the cached checkpoint for `family`, building it first if it is not there yet."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    out = checkpoint_path(family, cache_dir)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # A lock file, so that parallel test sessions don't build the same file twice.
    with open(f"{out}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return out
        # keeps the .safetensors suffix: comfy.utils.load_torch_file picks the format by extension
        tmp = out.with_name(out.stem + ".partial.safetensors")
        env = dict(os.environ, OMP_NUM_THREADS="1")  # more threads are much slower on the shared 2 cores
        proc = subprocess.run(
            [sys.executable, __file__, "--comfy", str(comfy_dir), "--family", family, "--out", str(tmp)],
            env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"building {family} failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        os.replace(tmp, out)  # atomic: a half-written file is never picked up as cached
        print(proc.stdout.strip(), file=sys.stderr)
    return out


# --------------------------------------------------------------------------------------------------
# Builder (runs in the subprocess, with ComfyUI importable)
# --------------------------------------------------------------------------------------------------
def _import_comfy(comfy_dir):
    sys.path.insert(0, str(comfy_dir))
    saved, sys.argv = sys.argv, [sys.argv[0]]  # comfy.cli_args must not parse our flags
    from comfy.cli_args import args
    args.cpu = True  # must precede comfy.model_management on a machine without CUDA
    import comfy.model_management  # noqa: F401
    sys.argv = saved


def _init_weights(root, torch):
    """comfy.ops.disable_weight_init / manual_cast leave parameters as torch.empty: fill them."""
    done = set()
    with torch.no_grad():
        for m in root.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                torch.nn.init.kaiming_uniform_(m.weight, a=5 ** 0.5)  # torch's default Linear/Conv init
                if m.bias is not None:
                    bound = m.weight[0].numel() ** -0.5
                    m.bias.uniform_(-bound, bound)
            elif isinstance(m, torch.nn.Embedding):
                m.weight.normal_(std=0.02)
            elif isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                if m.bias is not None:
                    m.bias.zero_()
            else:
                continue
            done.update(id(p) for p in m.parameters(recurse=False))
        for p in root.parameters():  # loose Parameters (CLIP text_projection, logit_scale, ...)
            if id(p) not in done:
                p.normal_(std=0.02)


def build(family, out, comfy_dir):
    _import_comfy(comfy_dir)
    import logging
    import torch
    import comfy.model_base
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.taesd.taesd
    import comfy.utils

    torch.manual_seed(1 if family.endswith("_alt") else 0)
    cls_name, type_name, cfg = FAMILIES[family]
    dtype = torch.float16  # what real checkpoints ship; halves file size
    t0 = time.time()

    model_config = getattr(comfy.supported_models, cls_name)({**_COMMON, **cfg})
    model_config.set_inference_dtype(dtype, None)
    model_type = comfy.model_base.ModelType[type_name]
    model_cls = comfy.model_base.SDXL if cls_name == "SDXL" else comfy.model_base.BaseModel
    model = model_cls(model_config, model_type=model_type, device=torch.device("cpu"))
    _init_weights(model.diffusion_model, torch)
    if family == "sd2v":
        with torch.no_grad():  # the SD20.model_type() v-prediction heuristic (see module docstring)
            model.diffusion_model.output_blocks[11][1].transformer_blocks[0].norm1.bias.normal_(std=0.2)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    clip = comfy.sd.CLIP(model_config.clip_target(), model_options={"dtype": dtype})
    _init_weights(clip.cond_stage_model, torch)
    if family in KL_VAE_FAMILIES:
        # A1111 rescales a prompt embedding by its mean before/after emphasis (mean ratio); after a final LayerNorm
        # with zero bias that mean is ~0 and the ratio NaN. Real text encoders have nonzero norm biases.
        with torch.no_grad():
            for m in clip.cond_stage_model.modules():
                if isinstance(m, torch.nn.LayerNorm) and m.bias is not None:
                    m.bias.normal_(std=0.1)

    if family in KL_VAE_FAMILIES:
        from comfy.ldm.models.autoencoder import AutoencoderKL
        vae_module = AutoencoderKL(ddconfig=_SD_KL_DDCONFIG, embed_dim=4)
        _init_weights(vae_module, torch)
    else:
        vae_module = comfy.taesd.taesd.TAESD(latent_channels=4)
        _init_weights(vae_module, torch)
        with torch.no_grad():  # identity latent scaling, so random decoder output stays in a sane range
            vae_module.vae_scale.fill_(1.0)
            vae_module.vae_shift.fill_(0.0)
    vae = comfy.sd.VAE(sd={k: v.to(dtype) for k, v in vae_module.state_dict().items()})
    t_build = time.time() - t0

    meta = {"esd_test_checkpoint": f"{family} v{BUILDER_VERSION} random weights, not a real model"}
    comfy.sd.save_checkpoint(str(out), patcher, clip, vae, metadata=meta)  # CheckpointSave's code path
    t_save = time.time() - t0 - t_build
    del patcher, model, clip, vae

    # Verify: detection through comfy.model_detection, then a full load as CheckpointLoaderSimple does
    # it, failing on any "missing" warning (a missing weight would be left uninitialised).
    sd, metadata = comfy.utils.load_torch_file(str(out), return_metadata=True)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    detected = comfy.model_detection.model_config_from_unet(sd, prefix, metadata=metadata)
    assert type(detected).__name__ == cls_name, f"detected {type(detected).__name__}, expected {cls_name}"
    detected_type = detected.model_type(sd, prefix).name
    assert detected_type == type_name, f"model_type {detected_type}, expected {type_name}"
    n_unet = comfy.utils.calculate_parameters(sd, prefix)
    n_all = comfy.utils.calculate_parameters(sd)
    del sd

    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda rec: warnings.append(rec.getMessage())
    logging.getLogger().addHandler(handler)
    t1 = time.time()
    m, c, v, _ = comfy.sd.load_checkpoint_guess_config(str(out), output_vae=True, output_clip=True)
    t_load = time.time() - t1
    logging.getLogger().removeHandler(handler)
    assert c is not None and v is not None, "checkpoint loaded without CLIP or VAE"
    assert type(m.model.model_config).__name__ == cls_name and m.model.model_type.name == type_name
    missing = [w for w in warnings if "missing" in w or "unexpected" in w]
    assert not missing, f"load warnings: {missing}"
    print(f"{family}: {cls_name}/{type_name}, {os.path.getsize(out) / 2**20:.0f} MiB, params unet "
          f"{n_unet / 1e6:.1f}M total {n_all / 1e6:.1f}M; build {t_build:.1f}s save {t_save:.1f}s "
          f"verify-load {t_load:.1f}s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy", default=str(DEFAULT_COMFY), help="ComfyUI directory (its classes build the file)")
    ap.add_argument("--family", choices=sorted(FAMILIES), required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    build(a.family, a.out, os.path.abspath(a.comfy))


if __name__ == "__main__":
    main()
