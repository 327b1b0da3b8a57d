"""ComfyUI nodes of the pack (V3 schema). Node ids are a contract with saved workflows: never rename them.

Each node turns its widgets into `esd_core` objects, calls the core, and hands results back through
the glue modules (`comfy_model`, `comfy_files`, `comfy_progress`); the algorithm itself lives in `esd_core`.
"""
from __future__ import annotations

import logging

import torch

from ..esd_core.config import (MAX_DDIM_STEPS, ESDConfig, Method, OptimizerName, RunOptions, SampleWith, check_schedule,
                               fast as fast_mode, parse_concepts)
from ..esd_core.erased_weights import DEFAULT_SAVE_DTYPE, SAVE_DTYPES, load_erased_weights, parse_save_dtype
from ..esd_core.errors import ESDError, TrainingOutOfMemory
from ..esd_core.lora_export import export_lora
from ..esd_core.trainer import encode_prompts, erase

from . import comfy_files as files
from . import comfy_model as model_glue
from . import comfy_preview as preview
from . import comfy_progress as progress
from .v3 import ComfyExtension, io, ui

log = logging.getLogger("esd")
CATEGORY = "training/concept_erasure"
ERASED_WEIGHTS = io.Custom("ERASED_WEIGHTS")
NO_FILE = "(none)"
TRAINING_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: SaveErasedCheckpoint's UNet dtypes ("model": the MODEL's own)
CHECKPOINT_DTYPES = {"model": None, **SAVE_DTYPES}


FAST_TOOLTIP = ("Fast mode, a preset of the x_t strategy measured best per method (README: 'Fast mode'). esd-x, "
                "esd-x-strict: one trajectory at a time sampled by the frozen model, every latent along it one "
                "iteration's x_t, the teacher's predictions recorded while sampling (about 5x less compute per "
                "iteration at DDIM 25). esd-u, esd-all, selfattn: the paper's per-iteration trajectory with DDIM 10 "
                "(they lose their erasure with trajectory pools).")
PREVIEW_TOOLTIP = ("Every N iterations (0 = off), sample the concept at a fixed seed with the weights as they are "
                   "now and show it on the node, so you see the concept fade: "
                   f"{preview.PREVIEW_STEPS} DDIM steps at half the training size (at least "
                   f"{preview.PREVIEW_MIN_SIDE} px), decoded with the vae input when it is connected. "
                   "Also shown before the first and after the last iteration. Cost: a preview at the training "
                   "size took 0.7 of a training iteration at DDIM 50 (toy model, tools/bench_preview.py), less at "
                   "half size; so preview_every 50 adds about 1-2% to a run.")


class LoadFrozenUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadFrozenUNet", display_name="ESD Load Frozen UNet", category=CATEGORY,
            description="Loads a checkpoint like Load Checkpoint and remembers its file name and content hash, so "
                        "erased weights record which base model they were trained on.",
            inputs=[io.Combo.Input("ckpt_name", options=model_glue.checkpoint_files(),
                                   tooltip="The Stable Diffusion 1.x, 2.x or SDXL checkpoint to erase concepts from.")],
            outputs=[io.Model.Output(tooltip="The UNet, used as the frozen base; ESD Erase Concept never modifies it."),
                     io.Clip.Output(tooltip="The text encoder, to encode the concepts."),
                     io.Vae.Output(tooltip="The VAE, to decode images.")],
        )

    @classmethod
    def execute(cls, ckpt_name: str) -> io.NodeOutput:
        return io.NodeOutput(*model_glue.load_checkpoint(ckpt_name))


class ESDTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ESDTrain", display_name="ESD Erase Concept", category=CATEGORY, is_experimental=True,
            is_output_node=True,  # it writes the erased-weights file, so it runs even with nothing wired after it
            description="Fine-tunes the model so its prediction for the concept imitates the frozen model's negatively "
                        "guided prediction (ESD, Gandikota et al. 2023). Saves the erased weights under "
                        "loras/esd. Re-runs only when an input changes (change the seed to train again).",
            inputs=[
                io.Model.Input("model", tooltip="The model to erase from (any loader). It is cloned, never modified."),
                io.Clip.Input("clip", tooltip="The model's text encoder, used to encode the concept prompts."),
                io.String.Input("concept", multiline=True, default="",
                                tooltip="The concept(s) to erase, one per line, as a caption the model knows "
                                        "(e.g. 'a painting by Van Gogh'). One line is drawn per iteration."),
                io.Combo.Input("method", options=[m.value for m in Method], default=Method.ESD_X.value,
                               tooltip="Layers to train. esd-x: cross-attention, for prompt-specific concepts such as "
                                       "an artist's style. esd-u: everything but cross-attention, for global concepts "
                                       "such as nudity or objects. esd-x-strict: cross-attention keys and values "
                                       "only. esd-all: all. selfattn: self-attention."),
                io.Float.Input("negative_guidance", default=1.0, min=0.0, max=20.0, step=0.1,
                               tooltip="How strongly to push away from the concept (the paper's eta, default 1; the "
                                       "official code's value is this plus 1)."),
                io.Float.Input("start_guidance", default=3.0, min=0.0, max=20.0, step=0.1,
                               tooltip="Classifier-free guidance used when sampling the training latents."),
                io.Int.Input("iterations", default=1000, min=1, max=100000,
                             tooltip="Training iterations (paper: 1000)."),
                io.Float.Input("learning_rate", default=1e-5, min=1e-8, max=1e-1, step=1e-6,
                               tooltip="Adam learning rate (paper: 1e-5)."),
                io.Int.Input("ddim_steps", default=50, min=2, max=MAX_DDIM_STEPS,
                             tooltip="DDIM schedule for the training latents: each iteration samples a random "
                                     "number of these steps from noise."),
                io.Int.Input("resolution", default=0, min=0, max=4096, step=8,
                             tooltip="Image size in pixels of the training latents; 0 = the model's native size "
                                     "(512 SD1, 768 SD2-v, 1024 SDXL)."),
                # control_after_generate=False: the frontend would otherwise add a "randomize" control to any INT
                # named seed, retraining on every queue and shifting saved workflows' widget values by one.
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed for noise, concept and timestep choices; the same seed gives the same "
                                     "erasure. Change it to train again."),
                io.String.Input("filename_prefix", default="ESD_erased",
                                tooltip="Name of the erased-weights file, saved in loras/esd (a subfolder may be "
                                        "given, never outside it)."),
                io.Combo.Input("sample_with", options=[s.value for s in SampleWith], default=SampleWith.TRAINED.value,
                               tooltip="Weights that sample the training latents: the model being trained (paper) or "
                                       "the frozen model."),
                io.String.Input("erase_from", default="", optional=True,
                                tooltip="Optional broader concept the erased one is mapped from (e.g. erase "
                                        "'cowboy hat' from 'cowboy'); one line for all concepts or one per concept."),
                io.Combo.Input("training_dtype", options=list(TRAINING_DTYPES), default="auto", optional=True,
                               tooltip="Compute dtype while training (autocast): auto = the model's own. The trained "
                                       "tensors are float32 either way."),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="Recompute activations during backward: less memory (useful for SDXL at "
                                         "1024 px), about a third more time per iteration."),
                io.Boolean.Input("fast", default=False, optional=True,
                                 tooltip=FAST_TOOLTIP),
                io.Int.Input("lora_rank", default=0, min=0, max=1024, optional=True,
                             tooltip="0: train the method's weights themselves. R > 0: train rank-R LoRA adapters on "
                                     "its layers instead (a small file any LoRA loader reads). Use 3x the full-weight "
                                     "learning rate: 3e-5 on SD1.5/SDXL (measured on the toy, README)."),
                io.Combo.Input("optimizer", options=[o.value for o in OptimizerName], default=OptimizerName.ADAM.value,
                               optional=True,
                               tooltip="adam: the paper's. adamw8bit: 8-bit moments, a quarter of Adam's memory "
                                       "(needs bitsandbytes). adafactor: almost no optimizer memory, relative steps "
                                       "(needs its own learning rate)."),
                io.Int.Input("checkpoint_every", default=0, min=0, max=100000, optional=True,
                             tooltip="0: no checkpoints. N > 0: keep a resumable checkpoint (loras/esd/<prefix>"
                                     ".esd-resume) every N iterations and when cancelled; removed when the run "
                                     "finishes."),
                io.Boolean.Input("resume", default=False, optional=True,
                                 tooltip="Continue from the checkpoint of this filename_prefix (same settings and "
                                         "model required; the result equals an uninterrupted run)."),
                io.Combo.Input("save_dtype", options=list(SAVE_DTYPES), default=DEFAULT_SAVE_DTYPE, optional=True,
                               tooltip="dtype of the saved erasure: fp16 (half the size of fp32, deviations below "
                                       "1e-3 of the largest change), bf16, or fp32 (exactly the trained weights)."),
                io.Int.Input("preview_every", default=0, min=0, max=100000, optional=True,
                             tooltip=PREVIEW_TOOLTIP),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional: the VAE that decodes the live preview (preview_every). Without it "
                                     "the preview is ComfyUI's fast latent preview (a rough colour image)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The erased model, ready for KSampler."),
                ERASED_WEIGHTS.Output(display_name="erased_weights",
                                      tooltip="The erasure, for ESD Apply Erased Weights."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per iteration, for Plot Loss Graph."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, concept: str, method: str, negative_guidance: float, start_guidance: float,
                iterations: int, learning_rate: float, ddim_steps: int, resolution: int, seed: int,
                filename_prefix: str, sample_with: str = "trained", erase_from: str = "",
                training_dtype: str = "auto", gradient_checkpointing: bool = False, fast: bool = False,
                lora_rank: int = 0, optimizer: str = OptimizerName.ADAM.value, checkpoint_every: int = 0,
                resume: bool = False, save_dtype: str = DEFAULT_SAVE_DTYPE, preview_every: int = 0,
                vae=None) -> io.NodeOutput:
        config = ESDConfig(concepts=parse_concepts(concept), method=method, iterations=iterations,
                           learning_rate=learning_rate, negative_guidance=negative_guidance,
                           start_guidance=start_guidance, ddim_steps=ddim_steps, resolution=resolution, seed=seed,
                           sample_with=sample_with, erase_from=parse_concepts(erase_from or ""), lora_rank=lora_rank,
                           optimizer=optimizer)
        if fast:
            config = fast_mode(config)
        if training_dtype not in TRAINING_DTYPES:  # ComfyUI does not check optional combos against their options
            raise ESDError(f"training_dtype must be one of {list(TRAINING_DTYPES)} (got {training_dtype!r})")
        parse_save_dtype(save_dtype)
        files.erased_weights_path(filename_prefix)  # a bad prefix fails now, not after training
        checkpoint = files.resume_checkpoint_path(filename_prefix) if checkpoint_every or resume else None
        options = RunOptions(gradient_checkpointing=gradient_checkpointing, checkpoint=checkpoint,
                             checkpoint_every=checkpoint_every, resume=resume)
        # the live view (chart, previews) reports how the run ended when the block is left, e.g. cancelled
        with progress.TrainingView(iterations, cls.hidden.unique_id, preview_every) as view, \
                torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; training needs autograd
            work = model.clone()
            adapter = model_glue.ComfyModelAdapter(work, clip, resolution, TRAINING_DTYPES[training_dtype])
            check_schedule(config.ddim_steps, len(adapter.alphas_cumprod))  # before the text encoder runs
            view.phase("encoding")
            prompts = encode_prompts(adapter, config)  # first: loading the UNet for training evicts the text encoder
            live = preview.LivePreview(adapter, config.concepts[0], seed, vae) if preview_every else None
            view.phase("loading")
            try:
                with adapter.session():  # the MODEL loaded and set up as KSampler runs it
                    if live is not None:
                        view.start_preview(live)
                    result = erase(adapter, config, options=options, prompts=prompts,
                                   should_cancel=model_glue.raise_if_interrupted, on_progress=view,
                                   on_phase=view.phase)
            except TrainingOutOfMemory:
                model_glue.free_memory()  # the core released the run's tensors; return the cached blocks too
                raise
            except model_glue.Interrupted:
                if checkpoint is not None and checkpoint.exists():
                    view.kept = (f"resumable checkpoint kept: {files.listed_name(checkpoint)} "
                                 "(queue again with resume on)")
                progress.show_text(f"cancelled; {view.kept or 'nothing saved'}", cls.hidden.unique_id)
                raise
            erased = result.to_erased_weights(adapter).cast(SAVE_DTYPES[save_dtype])  # downstream gets what is saved
            view.phase("saving")
            file_name = files.save_erasure(erased, filename_prefix, save_dtype)
            if checkpoint is not None:
                checkpoint.unlink(missing_ok=True)  # finished and saved: nothing left to resume
            erased_model = files.apply_erasure(model, erased, 1.0)
            log.info("ESD: erased %s with %s in %.0fs, saved %s", list(config.concepts), config.method.value,
                     result.seconds, file_name)
            summary = (f"saved loras/{file_name}\n{result.iterations_run} iterations, {result.trained_numel:,} "
                       f"weights, final loss {result.losses[-1]:.4g}")
            progress.show_text(summary, cls.hidden.unique_id)
            shown = view.done(file_name, result.losses, summary)
        return io.NodeOutput(erased_model, files.ErasedWeightsRef(erased, file_name), {"loss": result.losses},
                             ui=shown)


def _erasure_input(erased_weights: str, erased_weights_in):
    """(erasure, name) from the socket when connected, else from the chosen file."""
    if erased_weights_in is not None:
        return erased_weights_in.erased, erased_weights_in.file_name
    if erased_weights == NO_FILE:
        raise ESDError("no erased weights chosen: pick a file from loras/esd or connect erased_weights_in")
    return load_erased_weights(files.full_lora_path(erased_weights)), erased_weights


def _describe(erased) -> str:
    h = erased.header
    if h.kind != "lora":
        return f"full, {h.save_dtype}"
    rank = f"rank {h.rank}" if h.alpha is not None else f"ranks up to {h.rank}"
    return f"LoRA {rank}, {h.save_dtype}" + (f", {h.kept_energy:.1%} of the energy kept" if h.kept_energy else "")


class ApplyErasedWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyErasedWeights", display_name="ESD Apply Erased Weights", category=CATEGORY,
            description="Applies a saved erasure of any kind (full differences in fp16, bf16 or fp32, a trained or "
                        "exported LoRA, old version-1 files) to a model as weight patches (no copy of the model). "
                        "Strength 1 is the erasure as trained, 0 the unchanged model.",
            inputs=[
                io.Model.Input("model", tooltip="The model to apply the erasure to (the base it was trained on)."),
                io.Combo.Input("erased_weights", options=[NO_FILE, *files.erased_weight_files()],
                               tooltip="A saved erasure from loras/esd: full weights or LoRA, any version (not "
                                       "needed when erased_weights_in is connected)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Scale of the erasure: 1 = as trained, 0 = no change."),
                ERASED_WEIGHTS.Input("erased_weights_in", optional=True,
                                     tooltip="Optional: an erasure straight from ESD Erase Concept or ESD Export "
                                             "LoRA; used instead of the file when connected."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the erasure applied.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, erased_weights: str, strength: float, erased_weights_in=None) -> io.NodeOutput:
        erased, name = _erasure_input(erased_weights, erased_weights_in)
        patched = files.apply_erasure(model, erased, strength)
        text = (f"{name}: erased {', '.join(erased.header.concepts)} ({erased.header.method}; {_describe(erased)}) "
                f"at strength {strength}")
        warning = files.base_mismatch(model, erased)
        if warning:
            log.warning("ESD: %s: %s", name, warning)
            text += f"\nwarning: {warning}"
        progress.show_text(text, cls.hidden.unique_id)
        return io.NodeOutput(patched, ui=ui.PreviewText(text))


class ExportErasureLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ExportErasureLoRA", display_name="ESD Export LoRA", category=CATEGORY, is_output_node=True,
            description="Converts a saved erasure to a small LoRA (truncated SVD of each layer's change) that any "
                        "LoRA loader applies: ComfyUI's Load LoRA, Forge and A1111 (<lora:name:1>). Saves it in "
                        "loras/esd with the rank and the share of the erasure it keeps in its header.",
            inputs=[
                io.Combo.Input("erased_weights", options=[NO_FILE, *files.erased_weight_files()],
                               tooltip="The erasure to convert, from loras/esd (not needed when erased_weights_in is "
                                       "connected)."),
                io.Combo.Input("keep", options=["rank", "energy"], default="rank",
                               tooltip="rank: the same rank for every layer. energy: per layer, the smallest rank "
                                       "keeping that share of the layer's change."),
                io.Int.Input("rank", default=16, min=1, max=4096,
                             tooltip="LoRA rank of every layer (keep = rank); larger keeps more of the erasure and "
                                     "makes a larger file."),
                io.Float.Input("energy", default=0.9, min=0.01, max=1.0, step=0.01,
                               tooltip="Share of each layer's squared change to keep (keep = energy), in (0, 1]."),
                io.Combo.Input("save_dtype", options=list(SAVE_DTYPES), default=DEFAULT_SAVE_DTYPE,
                               tooltip="Precision of the saved LoRA: fp16 (half the size of fp32), bf16 or fp32."),
                io.String.Input("filename_prefix", default="ESD_lora",
                                tooltip="Name of the LoRA file, saved in loras/esd (never outside it)."),
                ERASED_WEIGHTS.Input("erased_weights_in", optional=True,
                                     tooltip="Optional: an erasure straight from ESD Erase Concept; used instead of "
                                             "the file when connected."),
            ],
            outputs=[ERASED_WEIGHTS.Output(display_name="lora", tooltip="The exported LoRA, for ESD Apply Erased "
                                                                        "Weights.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, erased_weights: str, keep: str, rank: int, energy: float, save_dtype: str,
                filename_prefix: str, erased_weights_in=None) -> io.NodeOutput:
        files.erased_weights_path(filename_prefix)  # a bad prefix fails now, not after the SVDs
        parse_save_dtype(save_dtype)
        erased, name = _erasure_input(erased_weights, erased_weights_in)
        choice = {"rank": rank} if keep == "rank" else {"energy": energy}
        lora = export_lora(erased, **choice, source=name)
        file_name = files.save_erasure(lora, filename_prefix, save_dtype)
        saved = lora.cast(SAVE_DTYPES[save_dtype])  # downstream gets exactly what the file holds
        text = f"saved loras/{file_name}\n{_describe(saved)}"
        progress.show_text(text, cls.hidden.unique_id)
        return io.NodeOutput(files.ErasedWeightsRef(saved, file_name), ui=ui.PreviewText(text))


class SaveErasedCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaveErasedCheckpoint", display_name="ESD Save Erased Checkpoint", category=CATEGORY,
            is_output_node=True,
            description="Saves the erased model with its text encoder and VAE as a full checkpoint in "
                        "checkpoints/esd, loadable by Load Checkpoint, with the erasure recorded in its header.",
            inputs=[io.Model.Input("model", tooltip="The erased model."),
                    io.Clip.Input("clip", tooltip="The text encoder to include."),
                    io.Vae.Input("vae", tooltip="The VAE to include."),
                    io.String.Input("filename_prefix", default="ESD_erased",
                                    tooltip="Checkpoint name, saved in checkpoints/esd (never outside it)."),
                    io.Combo.Input("save_dtype", options=list(CHECKPOINT_DTYPES), default="model", optional=True,
                                   tooltip="dtype of the saved UNet: model (the MODEL's own, as Save Checkpoint "
                                           "writes it), or fp32/fp16/bf16: the erased weights computed in float32 "
                                           "and rounded once to it.")],
            outputs=[],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, filename_prefix: str, save_dtype: str = "model") -> io.NodeOutput:
        name = files.save_checkpoint(model, clip, vae, filename_prefix, cls.hidden.prompt, cls.hidden.extra_pnginfo,
                                     CHECKPOINT_DTYPES[save_dtype])
        progress.show_text(f"saved checkpoints/{name}", cls.hidden.unique_id)
        return io.NodeOutput(ui=ui.PreviewText(f"saved checkpoints/{name}"))


class ESDExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadFrozenUNet, ESDTrain, ApplyErasedWeights, SaveErasedCheckpoint, ExportErasureLoRA]


