"""ComfyUI glue, model side: a `DiffusionModelAdapter` over a ModelPatcher and its CLIP, loading checkpoints with
their provenance, and preparing a model for training. Every ComfyUI model import of the pack lives here."""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import uuid
from typing import Iterator, Sequence

import torch

import comfy.conds
import comfy.lora
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import comfy.sd
import folder_paths

from ..esd_core.adapter import BaseModelInfo, Conditioning, ModelFamily, ParameterNaming
from ..esd_core.errors import ESDError

#: ComfyUI model config class -> (family, native resolution in pixels)
SUPPORTED_MODELS = {"SD15": (ModelFamily.SD1, 512), "SD20": (ModelFamily.SD2, 768), "SDXL": (ModelFamily.SDXL, 1024)}
#: where LoadFrozenUNet records a model's provenance (on the BaseModel, shared by clones: it describes the weights).
BASE_INFO_ATTR = "esd_base_info"


def supported_model(patcher) -> tuple[ModelFamily, int]:
    """Family and native resolution of a MODEL, or an `ESDError` naming the supported families."""
    name = type(patcher.model.model_config).__name__
    if name not in SUPPORTED_MODELS or not isinstance(patcher.model.model_sampling,
                                                       comfy.model_sampling.ModelSamplingDiscrete):
        raise ESDError(f"ESD supports Stable Diffusion 1.x, 2.x and SDXL UNets; this MODEL is {name}. "
                       "Load an SD1.5, SD2.x or SDXL checkpoint")
    family, native = SUPPORTED_MODELS[name]
    if family == ModelFamily.SD2 and patcher.model.model_type != comfy.model_base.ModelType.V_PREDICTION:
        native = 512  # SD2 base (epsilon) is a 512 px model; the v-prediction model is 768 px
    return family, native


#: Model options that change how KSampler *combines* the model's predictions into a guided step (the node that
#: usually sets them). ESD samples x_t with plain classifier-free guidance and builds its target from the raw
#: conditional and unconditional predictions, so it cannot apply them; a MODEL carrying one is refused.
GUIDANCE_OPTIONS = {
    "sampler_cfg_function": "a CFG function (RescaleCFG, PerpNeg, ...)",
    "sampler_pre_cfg_function": "a pre-CFG function (APG, TCFG, FreSca, ...)",
    "sampler_post_cfg_function": "a post-CFG function (PerturbedAttentionGuidance, SelfAttentionGuidance, CFGNorm, ...)",
    "sampler_calc_cond_batch_function": "a replacement of the batched prediction (SkipLayerGuidance, ...)",
}
#: Wrappers around KSampler's sampling loop (not around a prediction): ESD runs its own loop, so none would run.
SAMPLING_WRAPPERS = (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING,
                     comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, comfy.patcher_extension.WrappersMP.PREDICT_NOISE)
#: `Conditioning.extras` key marking the rows of the unconditional prompt ("" ), which KSampler runs as its
#: negative branch (``cond_or_uncond`` 1); patches such as IPAdapter's treat those rows differently.
UNCOND = "uncond"


def refused_options(patcher) -> list[str]:
    """What of a MODEL's options ESD cannot train through (see `GUIDANCE_OPTIONS`, `SAMPLING_WRAPPERS`)."""
    options = patcher.model_options
    found = [f"{what} ({key})" for key, what in GUIDANCE_OPTIONS.items() if options.get(key)]
    wrappers = {**options.get("transformer_options", {}).get("wrappers", {})}
    for kind, by_key in patcher.wrappers.items():
        wrappers.setdefault(kind, {}).update({f"patcher:{k}": v for k, v in by_key.items()})
    found += [f"a wrapper of KSampler's {kind}" for kind in SAMPLING_WRAPPERS if any(wrappers.get(kind, {}).values())]
    return found


class ComfyModelAdapter:
    """`DiffusionModelAdapter` over a ComfyUI ModelPatcher (LDM names) and the CLIP wired into the node.

    Predictions are the MODEL's as KSampler computes them: through ``comfy.samplers.calc_cond_batch`` with the MODEL's
    model options (attention and block patches, ``model_function_wrapper``, prediction and model wrappers), on weights
    ComfyUI patched when loading (LoRAs), with ``model_sampling`` doing the input scaling and the epsilon/v
    parameterisation: a variance-preserving ``x_t`` at DDPM step t is ComfyUI's ``x = x_t / sqrt(a_t)`` at
    ``sigma_t = sqrt((1 - a_t) / a_t)``, and epsilon is ``(x - denoised) / sigma``. A MODEL whose options change how
    KSampler combines predictions (`GUIDANCE_OPTIONS`) or wrap its sampling loop is refused.
    """

    naming = ParameterNaming.LDM

    def __init__(self, patcher, clip, resolution: int = 0, autocast_dtype: torch.dtype | None = None):
        refused = refused_options(patcher)
        if refused:
            raise ESDError(
                f"ESD cannot train through this MODEL: it carries {', '.join(refused)}. These act on how KSampler "
                "runs its steps and combines the conditional and unconditional predictions; ESD samples x_t with its "
                "own plain classifier-free guidance and trains on the raw predictions, so they would not act during "
                "training as they do when you sample. Wire ESD Erase Concept to the model before that node, and "
                "apply the node to the erased model instead")
        self.patcher = patcher
        self.clip = clip
        self.model = patcher.model
        self.unet = self.model.diffusion_model
        self.family, self.native_resolution = supported_model(patcher)
        self.resolution = resolution or self.native_resolution
        self.device = comfy.model_management.get_torch_device()
        # The compute dtype (the trainer enables fp16 loss scaling from it): the one asked for, else the model's own.
        # Anything but float32 runs under autocast, which also casts the float32 tensors being trained.
        self.dtype = autocast_dtype or self.model.manual_cast_dtype or self.model.get_dtype()
        self.autocast_dtype = self.dtype if self.dtype != torch.float32 else None
        # get_model_object honours a ModelSamplingDiscrete node's patch (e.g. v-prediction or zsnr overrides)
        self.sigmas = patcher.get_model_object("model_sampling").sigmas.float().to(self.device)
        self.alphas_cumprod = 1.0 / (1.0 + self.sigmas ** 2)
        self.latent_channels = int(self.model.latent_format.latent_channels)
        self.vae_scale_factor = 8
        self.base = base_info(patcher)
        # KSampler's per-run model options: a copy, with the patcher's own wrappers and callbacks merged in
        self.model_options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
        comfy.sampler_helpers.prepare_model_patcher(patcher, {}, self.model_options)
        self._uuids = (uuid.uuid4(), uuid.uuid4())  # one per branch for the whole run, as KSampler's conds have
        self._prepared = False

    def prepare_for_training(self) -> None:
        """Once: the node may load the model itself earlier (for the preview before training)."""
        if not self._prepared:
            prepare_for_training(self.patcher)
            self._prepared = True

    def memory_model(self):
        return memory_model(self.patcher, self.clip)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        contexts, pooled = [], []
        for text in prompts:
            cond, pool = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
            contexts.append(cond.clone())  # clone: tensors made under ComfyUI's inference mode cannot join autograd
            pooled.append(None if pool is None else pool.clone())
        context = _same_length(contexts).to(self.device)
        extras = {UNCOND: torch.tensor([t == "" for t in prompts], device=self.device)}
        if self.family == ModelFamily.SDXL:
            side = self.resolution
            y = [self.model.encode_adm(pooled_output=p, width=side, height=side, crop_w=0, crop_h=0,
                                       target_width=side, target_height=side) for p in pooled]
            extras["y"] = torch.cat(y).to(self.device)
        return Conditioning(context=context, extras=extras)

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        sigma = self.sigmas[timesteps]
        scale = (1.0 + sigma ** 2).sqrt().view(-1, 1, 1, 1)
        x = latents.float() * scale
        denoised = torch.empty_like(x)
        # no cast cache: it would hold a low-precision copy of every trained weight for the whole forward
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None,
                            cache_enabled=False):
            for rows, branches in _ksampler_batches(x, sigma, cond.extras[UNCOND]):
                conds = [None if b is None else self._comfy_cond(cond, b, i) for i, b in enumerate(branches)]
                out = comfy.samplers.calc_cond_batch(self.model, conds, x[rows], sigma[rows], self.model_options)
                for i, b in enumerate(branches):
                    if b is not None:
                        denoised[b] = out[i].float()
        return (x - denoised) / sigma.view(-1, 1, 1, 1)

    def _comfy_cond(self, cond: Conditioning, rows: list[int], branch: int) -> list[dict]:
        """One KSampler conditioning (positive: branch 0, negative: 1) holding the prompts of ``rows``, one per
        latent, in ComfyUI's processed form (what ``comfy.samplers.encode_model_conds`` makes of SD/SDXL prompts)."""
        model_conds = {"c_crossattn": comfy.conds.CONDCrossAttn(cond.context[rows])}
        if "y" in cond.extras:
            model_conds["y"] = comfy.conds.CONDRegular(cond.extras["y"][rows])
        return [{"model_conds": model_conds, "uuid": self._uuids[branch]}]

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The MODEL loaded for training and set up as KSampler sets it up for a run (the patcher's pre-run callbacks,
        patches cast to the device), undone on exit. Predictions are made inside it."""
        self.prepare_for_training()
        comfy.samplers.cast_to_load_options(self.model_options, device=self.device, dtype=self.patcher.model_dtype())
        self.patcher.pre_run()
        try:
            yield
        finally:
            self.patcher.cleanup()
            comfy.samplers.cast_to_load_options(self.model_options, device=self.patcher.offload_device)
            self._prepared = False


def _ksampler_batches(x: torch.Tensor, sigma: torch.Tensor, uncond: torch.Tensor):
    """Split a batch of predictions into calls as KSampler makes them: (rows of x to run, (rows whose prompt runs as
    the positive branch, rows whose prompt runs as the negative branch), each aligned with the rows run, or None).
    An unconditional row at the same latent and sigma as a conditional one is that row's negative branch (one call
    runs both, as at a KSampler step); the other rows run as positives or negatives alone."""
    positive = [i for i in range(len(x)) if not uncond[i]]
    pairs, negative = [], []
    for i in (i for i in range(len(x)) if uncond[i]):
        match = next((j for j in positive if sigma[j] == sigma[i] and torch.equal(x[j], x[i])), None)
        if match is None:
            negative.append(i)
        else:
            positive.remove(match)
            pairs.append((match, i))
    calls = []
    if pairs:
        calls.append(([p for p, _ in pairs], ([p for p, _ in pairs], [n for _, n in pairs])))
    if positive:
        calls.append((positive, (positive, None)))
    if negative:
        calls.append((negative, (None, negative)))
    return calls


def _same_length(contexts: list[torch.Tensor]) -> torch.Tensor:
    """Stack token sequences; prompts past 77 tokens get longer ones, so repeat each to a common length as ComfyUI's
    own conditioning batching does."""
    lengths = [c.shape[1] for c in contexts]
    common = math.lcm(*lengths)
    return torch.cat([c.repeat(1, common // c.shape[1], 1) for c in contexts])


_hash_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """sha256 of a file, computed once per (path, size, mtime) and remembered for the server's lifetime."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        _hash_cache[key] = h.hexdigest()
    return _hash_cache[key]


def load_checkpoint(ckpt_name: str):
    """(MODEL, CLIP, VAE) of a checkpoint, with the file's name and hash recorded on the model."""
    path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"))
    setattr(model.model, BASE_INFO_ATTR, BaseModelInfo(name=ckpt_name, file_hash=file_sha256(path)))
    return model, clip, vae


def base_info(patcher) -> BaseModelInfo:
    return getattr(patcher.model, BASE_INFO_ATTR, None) or BaseModelInfo(
        name="unknown (loaded without ESD Load Frozen UNet)")


def patched_weights(patcher, names) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float32 value) of UNet tensors (LDM names) as the MODEL computes with them: the loaded checkpoint's
    values with the MODEL's weight patches (LoRAs, erasures) added by ComfyUI's own ``calculate_weight``, whichever
    clone's patches are applied at the moment. One tensor at a time (an ESD-u selection is most of the UNet)."""
    state = patcher.model.diffusion_model.state_dict()
    for n in names:
        key = f"diffusion_model.{n}"
        backup = patcher.backup.get(key)  # shared by clones: the original of whatever is patched in now
        weight = (backup.weight if backup is not None else state[n]).to(torch.float32, copy=True)
        _, _, convert = comfy.model_patcher.get_key_weight(patcher.model, key)
        if convert is not None:  # quantised storage (e.g. scaled fp8): its real values
            weight = convert(weight, inplace=True)
        if key in patcher.patches:
            weight = comfy.lora.calculate_weight(patcher.patches[key], weight, key)
        yield n, weight


def prepare_for_training(patcher) -> None:
    """Load the model fully onto the compute device with its weight patches applied (evicting every other model, the
    text encoder included: prompts are encoded before this), as ComfyUI's own training node does; models the MODEL
    brings along (e.g. an IPAdapter's) are loaded with it, as KSampler loads them."""
    comfy.model_management.load_models_gpu([patcher, *patcher.get_nested_additional_models()], memory_required=1e20,
                                           force_full_load=True)


#: What ComfyUI's Cancel raises inside a node.
Interrupted = comfy.model_management.InterruptProcessingException


def raise_if_interrupted() -> bool:
    """Cancel check for the trainer: ComfyUI's Cancel raises its own interrupt exception (never returns True)."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


def checkpoint_files() -> list[str]:
    """Checkpoints as ComfyUI's loaders list them."""
    return folder_paths.get_filename_list("checkpoints")


def memory_model(patcher, clip=None):
    """The memory planner's view of a MODEL (`esd_core.plan.MemoryModel`): ComfyUI's own UNet class rebuilt from the
    model's config on the meta device (structurally identical, no memory), called as ``apply_model`` calls it.

    ComfyUI's split and sub-quadratic attention (its CPU choice) ask the device for free memory, which the meta device
    cannot answer; the plan runs them as ComfyUI's basic attention, which keeps the same softmax for backward (the
    sampling forward, chunked in reality, is then over-estimated). PyTorch attention (ComfyUI's CUDA choice) is
    planned as it runs.
    """
    import comfy.ldm.modules.attention as attention
    import comfy.ops

    from ..esd_core.memory import checkpoint_units
    from ..esd_core.plan import MemoryModel

    _, native = supported_model(patcher)
    config = patcher.model.model_config.unet_config
    unet = type(patcher.model.diffusion_model)(**config, device="meta", operations=comfy.ops.disable_weight_init)
    context_dim, adm_channels = config["context_dim"], config.get("adm_in_channels")
    # the override receives the undecorated attention function (comfy's wrap_attn)
    needs_free_memory = {attention.attention_split.__wrapped__, attention.attention_sub_quad.__wrapped__}

    def runs_on_meta(chosen, *args, **kwargs):
        return (attention.attention_basic.__wrapped__ if chosen in needs_free_memory else chosen)(*args, **kwargs)

    def forward(module, batch: int, side: int) -> torch.Tensor:
        meta = dict(device="meta")
        y = torch.empty(batch, adm_channels, **meta) if adm_channels else None
        return module(torch.empty(batch, module.in_channels, side, side, **meta), torch.full((batch,), 500.0, **meta),
                      context=torch.empty(batch, 77, context_dim, **meta), y=y,
                      transformer_options={"optimized_attention_override": runs_on_meta})

    text = 0 if clip is None else sum(p.numel() for p in clip.cond_stage_model.parameters())
    return MemoryModel(unet, forward, checkpoint_units, native, latent_channels=unet.in_channels,
                       text_encoder_parameters=text,
                       label=type(patcher.model.model_config).__name__)
