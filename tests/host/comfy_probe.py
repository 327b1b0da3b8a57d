"""Measurements inside ComfyUI's own model code, run in a subprocess (ComfyUI's global state never enters pytest).

    python comfy_probe.py --comfy DIR --pack DIR --checkpoint FILE --probe checkpointing [--args JSON]

loads the checkpoint as CheckpointLoaderSimple does, wraps it in the pack's ComfyUI adapter (the pack imported as a
package, as the server imports it) and prints one JSON object with what the probe measured. Tests call `run_probe`.
Reference predictions are ComfyUI's own: a one-step sampler run through ``comfy.sample.sample_custom`` (KSampler's
path: conditioning processing, model options, wrappers, weight patches) that records the denoised it is given.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

PACK = "esd_concept_erasure"


def run_probe(probe: str, checkpoint: Path, comfy_dir: Path, pack_dir: Path, timeout: float = 900,
              **args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, "--comfy", str(comfy_dir), "--pack", str(pack_dir),
                           "--checkpoint", str(checkpoint), "--probe", probe, "--args", json.dumps(args)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {probe} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _import(comfy_dir: str, pack_dir: str, fp32_text_encoder: bool = False):
    sys.path.insert(0, comfy_dir)
    saved, sys.argv = sys.argv, [sys.argv[0]]
    from comfy.cli_args import args
    args.cpu = True  # must precede comfy.model_management on a machine without CUDA
    args.fp32_text_enc = fp32_text_encoder  # else ComfyUI's CPU default: fp16 CLIP
    import comfy.model_management  # noqa: F401
    sys.argv = saved
    links = tempfile.mkdtemp()
    os.symlink(pack_dir, os.path.join(links, PACK))
    sys.path.insert(0, links)
    import importlib
    return SimpleNamespace(**{name: importlib.import_module(f"{PACK}.{module}") for name, module in (
        ("comfy_model", "nodes.comfy_model"), ("memory", "esd_core.memory"), ("weights", "esd_core.weights"),
        ("keymap", "esd_core.keymap"), ("errors", "esd_core.errors"),
        ("testing", "esd_core.testing"))})


def _load(checkpoint: str, dtype=None):
    import comfy.sd

    model_options = {} if dtype is None else {"dtype": dtype}
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, output_clip=True,
                                                              model_options=model_options)
    return model, clip


def ksampler_denoised(model, clip, positive: str, negative: str, cfg: float, x, sigma: float):
    """ComfyUI's own denoised prediction at ComfyUI-space input ``x`` and ``sigma``, through KSampler's machinery
    (comfy.sample.sample_custom with a sampler that makes one model call). Returns (input it saw, denoised)."""
    import comfy.sample
    import comfy.samplers
    import torch

    seen = {}

    def one_call(model_k, noise, sigmas, extra_args=None, callback=None, disable=None):
        seen["x"] = noise
        seen["denoised"] = model_k(noise, sigmas[0] * noise.new_ones(noise.shape[0]), **extra_args)
        return noise

    def cond(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    # with a zero latent and sigma below the schedule's maximum, KSampler's input is noise * sigma: pass x / sigma.
    # Under inference mode, as ComfyUI runs every node.
    with torch.inference_mode():
        comfy.sample.sample_custom(model, x / sigma, cfg, comfy.samplers.KSAMPLER(one_call),
                                   torch.tensor([sigma, 0.0]), cond(positive), cond(negative), torch.zeros_like(x))
    return seen["x"].clone(), seen["denoised"].clone()


def adapter_eps(adapter, prompts: list[str], x, t: int, cfg: float | None):
    """The adapter's epsilon for ComfyUI-space input ``x`` at DDPM step t: of prompts[1] (cfg None), or guided from
    (prompts[0] = negative, prompts[1]) as ESD samples x_t: one batch of both branches."""
    import torch

    sigma = adapter.sigmas[t]
    latents = x / (1 + sigma ** 2).sqrt()  # ComfyUI's input back to the variance-preserving x_t the core uses
    cond = adapter.encode_prompts(prompts)
    with torch.no_grad():
        if cfg is None:
            return adapter.predict_noise(latents, torch.tensor([t]), cond.row(1))
        eps_uncond, eps_cond = adapter.predict_noise(torch.cat([latents, latents]), torch.tensor([t, t]), cond).chunk(2)
    return eps_uncond + cfg * (eps_cond - eps_uncond)


def probe_checkpointing(pack, checkpoint: str) -> dict:
    """Which units ComfyUI's UNet gets, how often each runs in one training pass with and without gradient
    checkpointing, and the bytes autograd saves for backward in each case."""
    import torch

    comfy_model, memory = pack.comfy_model, pack.memory
    model, clip = _load(checkpoint)
    with torch.inference_mode(False):
        work = model.clone()
        adapter = comfy_model.ComfyModelAdapter(work, clip, resolution=64)
        cond = adapter.encode_prompts(["a painting"])
        with adapter.session():
            unet = adapter.unet
            units = memory.checkpoint_units(unet)
            calls = pack.testing.count_forward_calls(units)
            for p in unet.parameters():  # inference-mode weights cannot be saved for backward: as the trainer does
                p.requires_grad_(False)
            saved = [0]

            def pack_hook(t):
                saved[0] += t.numel() * t.element_size()
                return t

            def training_pass():
                x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
                x.requires_grad_(True)  # stands in for trained weights: gradients flow through every unit
                with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
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


def probe_predictions(pack, checkpoint: str, prompts: list[str], timesteps: list[int], resolution: int,
                      v_prediction: bool = False) -> dict:
    """The adapter's epsilon for every (prompt, t) at a seeded x_t (float32 CLIP), as lists, and the largest gap
    to ComfyUI's own KSampler prediction of the same input. ``v_prediction``: the MODEL through ComfyUI's stock
    ModelSamplingDiscrete node set to v_prediction (an object patch: the same weights read as a v model)."""
    import torch
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    model, clip = _load(checkpoint)
    if v_prediction:
        (model,) = ModelSamplingDiscrete().patch(model, "v_prediction", False)
    side = resolution // 8
    out = {"eps": [], "gap_to_ksampler": 0.0}
    with torch.inference_mode(False):
        adapter = pack.comfy_model.ComfyModelAdapter(model.clone(), clip, resolution=resolution)
        noise = torch.randn(len(timesteps), 4, side, side, generator=torch.Generator().manual_seed(0))
        for prompt in prompts:
            for i, t in enumerate(timesteps):
                sigma = float(adapter.sigmas[t])
                x, denoised = ksampler_denoised(model, clip, prompt, "", 1.0, noise[i:i + 1] * sigma, sigma)
                with adapter.session():
                    eps = adapter_eps(adapter, ["", prompt], x, t, None)
                reference = (x - denoised) / sigma
                out["gap_to_ksampler"] = max(out["gap_to_ksampler"], float((eps - reference).abs().max()))
                vp = x / (1 + sigma ** 2) ** 0.5
                out["eps"].append({"prompt": prompt, "t": t, "x_t": vp.flatten().tolist(),
                                   "eps": eps.detach().flatten().tolist()})
    return out


def _random_lora(pack, unet, scale: float, seed: int = 0) -> dict:
    """A rank-4 LoRA in the stock kohya form on every cross-attention key/value projection, each changing its weight
    by about ``scale`` of the weight's spread."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, p in unet.named_parameters():
        if name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            stem = pack.keymap.module_stem(name.rpartition(".")[0])
            up, down = torch.randn(p.shape[0], 4, generator=g), torch.randn(4, p.shape[1], generator=g)
            up *= scale * float(p.float().std()) / float((up @ down).std())
            lora |= {f"{stem}.lora_up.weight": up, f"{stem}.lora_down.weight": down,
                     f"{stem}.alpha": torch.tensor(4.0)}
    return lora


def probe_model_options(pack, checkpoint: str) -> dict:
    """For MODELs carrying weight patches and model options: the largest gap between the adapter's (guided)
    epsilon and ComfyUI's KSampler prediction, how far the variant's prediction is from the plain model's (so the
    option visibly acts), the cond_or_uncond lists an attention patch saw on both paths; and the messages of the
    MODELs the adapter refuses."""
    import comfy.sd
    import torch
    import comfy.ldm.modules.attention
    from comfy_extras.nodes_model_advanced import RescaleCFG
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    base, clip = _load(checkpoint)
    t, cfg, prompt = 400, 3.0, "a painting of a cat"
    seen: list = []

    def recording_attn2(q, context, value, extra_options):
        seen.append(list(extra_options["cond_or_uncond"]))
        return q, context * 1.5, value  # and changes what cross-attention reads

    def with_options(setup):
        m = base.clone()
        setup(m)
        return m

    def halving_wrapper(apply_model, args):
        return apply_model(args["input"], args["timestep"], **args["c"]) * 0.5

    def diffusion_wrapper(executor, *args, **kwargs):
        return executor(*args, **kwargs) * 0.9

    lora_model, _ = comfy.sd.load_lora_for_models(base, None, _random_lora(pack, base.model.diffusion_model, 0.5),
                                                  1.0, 0)
    variants = {
        "plain": base,
        "lora": lora_model,
        "output_block_patch": with_options(lambda m: m.set_model_output_block_patch(
            lambda h, hsp, transformer_options: (h * 1.2, hsp))),
        "attn2_replace": with_options(lambda m: m.set_model_attn2_replace(
            lambda q, k, v, extra_options: comfy.ldm.modules.attention.optimized_attention(
                q, k * 2, v, extra_options["n_heads"]), "input", 1, 0)),
        "model_function_wrapper": with_options(lambda m: m.set_model_unet_function_wrapper(halving_wrapper)),
        "diffusion_model_wrapper": with_options(lambda m: m.add_wrapper_with_key(
            "diffusion_model", "probe", diffusion_wrapper)),
        "attn2_patch": with_options(lambda m: m.set_model_attn2_patch(recording_attn2)),
    }
    side = 8
    x = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1))
    result, plain_eps = {}, None
    with torch.inference_mode(False):
        for name, m in variants.items():
            adapter = pack.comfy_model.ComfyModelAdapter(m.clone(), clip, resolution=side * 8)
            sigma = float(adapter.sigmas[t])
            seen.clear()
            xs, denoised = ksampler_denoised(m, clip, prompt, "", cfg, x * sigma, sigma)
            ksampler_seen = list(seen)
            seen.clear()
            with adapter.session():
                eps = adapter_eps(adapter, ["", prompt], xs, t, cfg).detach()
            reference = (xs - denoised) / sigma
            plain_eps = eps if name == "plain" else plain_eps
            result[name] = {"gap_to_ksampler": float((eps - reference).abs().max()),
                            "scale": float(reference.abs().max()),
                            "change_from_plain": float((eps - plain_eps).abs().max()),
                            "cond_or_uncond": {"ksampler": ksampler_seen, "adapter": list(seen)}}
        refused = {"rescale_cfg": RescaleCFG().patch(base, 0.7)[0],
                   "perturbed_attention_guidance": PerturbedAttentionGuidance.execute(base, 3.0).result[0],
                   "sampler_wrapper": with_options(lambda m: m.add_wrapper_with_key(
                       "outer_sample", "probe", lambda executor, *a, **k: executor(*a, **k)))}
        result["refused"] = {}
        for name, m in refused.items():
            try:
                pack.comfy_model.ComfyModelAdapter(m.clone(), clip, resolution=64)
                result["refused"][name] = None
            except pack.errors.ESDError as e:
                result["refused"][name] = str(e)
    return result


def probe_base_fingerprints(pack, checkpoint: str) -> dict:
    """The same weights in float32 and fp16 (a float32 copy of the checkpoint with values fp16 cannot hold, loaded
    both ways), with and without a LoRA patched in at load (stochastic rounding in fp16): whether fingerprints and
    exact hashes agree. The trained side is the weights as loaded for training (what the trainer reads)."""
    import comfy.sd
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(checkpoint)
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():  # values between fp16's: a loader's rounding now changes them
        if k.startswith("model.diffusion_model.") and v.is_floating_point():
            v = v.float()
            sd[k] = v + 1e-3 * v * torch.randn(v.shape, generator=g)
    fp32_file = os.path.join(tempfile.mkdtemp(), "fp32.safetensors")
    save_file(sd, fp32_file)
    weights = pack.weights
    models = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        model, clip = _load(fp32_file, dtype)
        names = [n for n, _ in model.model.diffusion_model.named_parameters() if ".attn2." in n]
        lora = _random_lora(pack, model.model.diffusion_model, 0.1)
        models[dtype_name] = model
        models[f"{dtype_name}+lora"] = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)[0]
    with torch.inference_mode(False):
        trained = {}  # what the trainer fingerprints: the selected weights as loaded for training
        for name, m in models.items():
            adapter = pack.comfy_model.ComfyModelAdapter(m.clone(), clip, resolution=64)
            with adapter.session():
                params = dict(adapter.unet.named_parameters())
                trained[name] = ({n: params[n].data for n in names}, str(params[names[0]].dtype))
        applied = {name: dict(pack.comfy_model.patched_weights(m, names)) for name, m in models.items()}
    out = {"dtypes": {name: dt for name, (_, dt) in trained.items()}}
    for a in models:
        for b in models:
            out[f"{a} -> {b}"] = {
                "same_base": weights.same_weights(weights.weights_fingerprint(trained[a][0]),
                                                  weights.weights_fingerprint(applied[b])),
                "same_exact_hash": weights.tensors_hash(trained[a][0]) == weights.tensors_hash(applied[b])}
    return out


PROBES = {"checkpointing": probe_checkpointing, "predictions": probe_predictions,
          "model_options": probe_model_options, "base_fingerprints": probe_base_fingerprints}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfy", required=True)
    parser.add_argument("--pack", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--probe", choices=sorted(PROBES), required=True)
    parser.add_argument("--args", default="{}", help="JSON keyword arguments of the probe")
    a = parser.parse_args()
    kwargs = json.loads(a.args)
    pack = _import(a.comfy, a.pack, fp32_text_encoder=kwargs.pop("fp32_text_encoder", False))
    print(json.dumps(PROBES[a.probe](pack, a.checkpoint, **kwargs)))
