"""Command line: ``python -m esd_core erase | apply | info | export-lora`` on local diffusers Stable Diffusion
folders, and ``python -m esd_core plan``, the memory planner for the named model families."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from .config import ESDConfig, Method, OptimizerName, RunOptions, SampleWith, fast
from .errors import ErasureCancelled, ESDError

DTYPES = ("auto", "fp32", "bf16", "fp16")
SAVE_DTYPES = ("fp16", "bf16", "fp32")  # esd_core.erased_weights.SAVE_DTYPES, without importing torch at parse time


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m esd_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    erase = sub.add_parser("erase", help="erase concepts from a local diffusers pipeline and save the erased weights")
    erase.add_argument("--model", required=True, help="local diffusers SD 1.x/2.x or SDXL pipeline folder")
    erase.add_argument("--concept", action="append", required=True, help="concept to erase (repeat for several)")
    erase.add_argument("--method", default=Method.ESD_X.value,
                       help="layers to train: esd-x (styles), esd-x-strict, esd-u (global), esd-all, selfattn; "
                            "aliases xattn, noxattn, full")
    erase.add_argument("--iterations", type=int, default=1000)
    erase.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate")
    erase.add_argument("--negative-guidance", type=float, default=1.0, help="the paper's eta (official code: eta+1)")
    erase.add_argument("--start-guidance", type=float, default=3.0, help="CFG scale when sampling x_t")
    erase.add_argument("--ddim-steps", type=int, default=50)
    erase.add_argument("--resolution", type=int, default=0, help="pixels; 0 = the model's native size")
    erase.add_argument("--seed", type=int, default=0)
    erase.add_argument("--sample-with", choices=[s.value for s in SampleWith], default=SampleWith.TRAINED.value,
                       help="weights that sample x_t: trained (paper) or frozen")
    erase.add_argument("--erase-from", action="append", default=[],
                       help="broader concept the erased one is mapped from (once for all, or once per --concept)")
    _add_runtime_args(erase)
    erase.add_argument("--fast", action="store_true",
                       help="the measured-fastest x_t strategy for the method (esd_core.config.fast; see the README)")
    erase.add_argument("--lora-rank", type=int, default=0,
                       help="train rank-R LoRA adapters on the method's layers (0 = the weights themselves); the "
                            "file is a standard LoRA. Needs a higher --lr (README)")
    erase.add_argument("--optimizer", choices=[o.value for o in OptimizerName], default=OptimizerName.ADAM.value,
                       help="adam (the paper's), adamw8bit (bitsandbytes, a quarter of Adam's state) or adafactor")
    erase.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    erase.add_argument("--checkpoint-every", type=int, default=0,
                       help="keep a resumable checkpoint (beside --out, as .esd-resume) every N iterations and when "
                            "the run is interrupted with Ctrl-C; removed when the run finishes")
    erase.add_argument("--resume", action="store_true",
                       help="continue from the checkpoint beside --out (same settings and model required)")
    erase.add_argument("--out", required=True, help="new .safetensors file for the erased weights")
    _add_save_dtype(erase)
    erase.add_argument("--save-pipeline", help="also write the full erased pipeline to this new folder")
    _add_pipeline_dtype(erase)

    apply = sub.add_parser("apply", help="apply an erased-weights file (full or LoRA) and save the erased pipeline")
    apply.add_argument("--model", required=True, help="local diffusers SD 1.x/2.x or SDXL pipeline folder")
    apply.add_argument("--weights", required=True, help="erased-weights .safetensors file (any kind or version)")
    apply.add_argument("--strength", type=float, default=1.0, help="1 = as trained, 0 = base model")
    _add_runtime_args(apply)
    apply.add_argument("--save-pipeline", required=True, help="new folder for the erased pipeline")
    _add_pipeline_dtype(apply)

    info = sub.add_parser("info", help="print an erased-weights file's header")
    info.add_argument("file")

    export = sub.add_parser("export-lora", help="convert an erasure to a LoRA by truncated SVD per layer")
    export.add_argument("--weights", required=True, help="erased-weights .safetensors file")
    keep = export.add_mutually_exclusive_group(required=True)
    keep.add_argument("--rank", type=int, help="rank of every layer's LoRA")
    keep.add_argument("--energy", type=float,
                      help="per layer, the fewest singular values keeping this fraction (0, 1] of its squared norm")
    export.add_argument("--out", required=True, help="new .safetensors file for the LoRA")
    _add_save_dtype(export)
    _add_plan_parser(sub)
    return parser


def _add_save_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save-dtype", choices=SAVE_DTYPES, default=SAVE_DTYPES[0],
                   help="dtype of the saved tensors: fp16 (default, half the size), bf16, or fp32 (exact)")


def _add_pipeline_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save-pipeline-dtype", choices=("auto", *SAVE_DTYPES), default="auto",
                   help="dtype of the saved pipeline's weights: auto (default) keeps each part's dtype in --model "
                        "(not --dtype, which is only how training computes)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype the model is loaded and computes in (under autocast); trained tensors are float32 "
                        "either way. auto: bf16 on a CUDA device that supports it, else fp32")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never let huggingface libraries reach for the network
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        commands = {"erase": run_erase, "apply": run_apply, "info": run_info, "export-lora": run_export_lora,
                    "plan": run_plan}
        return commands[args.command](args)
    except ErasureCancelled as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except (ESDError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was saved", file=sys.stderr)
        return 130


def _check_new(path: str | None, what: str) -> None:
    if path and Path(path).exists():
        raise FileExistsError(f"{what} {path} already exists; choose another name (nothing was overwritten)")


def run_erase(args: argparse.Namespace) -> int:
    from .erased_weights import save_erased_weights
    from .files import write_new_file
    from .resume import checkpoint_path_for
    from .trainer import erase

    config = ESDConfig(
        concepts=tuple(args.concept), method=args.method, iterations=args.iterations, learning_rate=args.lr,
        negative_guidance=args.negative_guidance, start_guidance=args.start_guidance, ddim_steps=args.ddim_steps,
        resolution=args.resolution, seed=args.seed, sample_with=args.sample_with, erase_from=tuple(args.erase_from),
        lora_rank=args.lora_rank, optimizer=args.optimizer)
    if args.fast:
        config = fast(config)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ESDError(f"--out must name a .safetensors file (got {out})")
    loss_log = out.with_suffix(".loss.csv")
    for path, what in ((out, "output file"), (loss_log, "loss log"), (args.save_pipeline, "pipeline folder")):
        _check_new(str(path) if path else None, what)  # fail before training, not after

    checkpoint = checkpoint_path_for(out) if args.checkpoint_every or args.resume else None
    options = RunOptions(gradient_checkpointing=args.gradient_checkpointing, checkpoint=checkpoint,
                         checkpoint_every=args.checkpoint_every, resume=args.resume)
    adapter = _load_adapter(args)
    with _graceful_interrupt() as interrupted:
        result = erase(adapter, config, options=options, on_progress=_progress_bar(config.iterations),
                       should_cancel=interrupted)
    erased = result.to_erased_weights(adapter)
    save_erased_weights(out, erased, save_dtype=args.save_dtype)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # the run finished and its result is saved: nothing left to resume
    rows = "".join(f"{i},{loss:.8g}\n" for i, loss in enumerate(result.losses, 1))
    write_new_file(loss_log, lambda tmp: tmp.write_text("step,loss\n" + rows))
    print(f"erased {list(config.concepts)} with {config.method.value}: {result.iterations_run} iterations in "
          f"{result.seconds:.1f}s ({result.seconds / result.iterations_run:.3f} s/it), {result.trained_numel:,} "
          f"weights trained, final loss {result.losses[-1]:.4g}")
    print(f"wrote {out} and {loss_log}")
    if args.save_pipeline:
        del adapter, result  # the pipeline is written from the base folder, not from the training copy
        _save_pipeline(args.model, erased, 1.0, args.save_pipeline, args.save_pipeline_dtype)
    return 0


def run_apply(args: argparse.Namespace) -> int:
    from .erased_weights import load_erased_weights

    _check_new(args.save_pipeline, "pipeline folder")
    erased = load_erased_weights(args.weights)
    _save_pipeline(args.model, erased, args.strength, args.save_pipeline, args.save_pipeline_dtype)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from .erased_weights import load_erased_weights

    erased = load_erased_weights(args.file)
    h = erased.header
    ranks = sorted({c.lora.rank for c in erased.modules.values() if c.lora is not None})
    rows = [("concepts", ", ".join(h.concepts)), ("method", h.method), ("iterations run", h.iterations_run),
            ("model family", h.model_family), ("base model", h.base_model), ("base hash", h.base_hash or "-"),
            ("base tensors hash", h.base_tensors_hash), ("created", h.created), ("esd version", h.esd_version),
            ("format version", h.format_version), ("kind", h.kind), ("save dtype", h.save_dtype),
            ("modules", f"{len(erased.modules)} ({erased.numel():,} numbers stored)")]
    if ranks:
        rows += [("lora rank", f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]} to {ranks[-1]}"),
                 ("lora alpha", "each layer's rank" if h.alpha is None else f"{h.alpha:g}")]
    if h.kept_energy is not None:
        rows += [("kept energy", f"{h.kept_energy:.4f}"), ("exported from", json.dumps(h.export, sort_keys=True))]
    if h.dropped:
        rows.append(("dropped", f"{len(h.dropped)} bias differences of low-rank layers (A1111 cannot apply them)"))
    rows += [(f"  {k}", v) for k, v in sorted(h.hyperparameters.items())]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    return 0


def run_export_lora(args: argparse.Namespace) -> int:
    from .erased_weights import load_erased_weights, save_erased_weights
    from .lora_export import ExportSpec, export_lora

    spec = ExportSpec(rank=args.rank, energy=args.energy)  # bad values fail before anything is read
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ESDError(f"--out must name a .safetensors file (got {out})")
    _check_new(str(out), "output file")
    erased = load_erased_weights(args.weights)
    lora = export_lora(erased, rank=spec.rank, energy=spec.energy, source=Path(args.weights).name)
    save_erased_weights(out, lora, save_dtype=args.save_dtype)
    h = lora.header
    print(f"wrote {out}: LoRA rank {'up to ' if h.alpha is None else ''}{h.rank} of {len(lora.modules)} modules, "
          f"{h.kept_energy:.2%} of the erasure's energy kept, {out.stat().st_size / 2**20:.2f} MiB "
          f"({len(h.dropped)} bias differences of low-rank layers dropped)")
    return 0


def _load_adapter(args: argparse.Namespace):
    import torch

    from .diffusers_adapter import adapter_from_folder, quiet_hf_logging

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype) or auto_dtype(device)
    quiet_hf_logging()
    return adapter_from_folder(args.model, device=device, dtype=dtype,
                               resolution=getattr(args, "resolution", 0))  # SDXL's size conditioning


def auto_dtype(device):
    """bf16 where the device computes it natively (CUDA with bf16 support), float32 elsewhere (CPU runs stay float32)."""
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _save_pipeline(model: str, erased, strength: float, folder: str, dtype: str = "auto") -> None:
    """Write the pipeline in ``model`` with the erasure merged into its UNet to the new ``folder``. It is loaded in
    float32 (exact for any stored dtype) and merged there, then each part is saved in its own stored dtype
    (``dtype`` "auto") or the one named: the merged weights are rounded once, to the saved dtype, whatever dtype
    training computed in."""
    import torch

    from .diffusers_adapter import adapter_from_folder, quiet_hf_logging, stored_dtype
    from .erased_weights import SAVE_DTYPES as TORCH_SAVE_DTYPES, apply_to_module
    from .files import write_new_directory

    quiet_hf_logging()
    adapter = adapter_from_folder(model, dtype=torch.float32)
    warning = apply_to_module(adapter.unet, erased, strength, adapter.naming, adapter.family.value)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    for name, part in adapter.pipeline.components.items():
        if isinstance(part, torch.nn.Module):
            target = TORCH_SAVE_DTYPES[dtype] if dtype != "auto" else stored_dtype(Path(model) / name)
            part.to(target or torch.float32)
    write_new_directory(folder, lambda tmp: adapter.pipeline.save_pretrained(tmp))
    print(f"wrote the erased pipeline (strength {strength}) to {folder}")


def _progress_bar(total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, desc="erasing", unit="it", disable=None)  # disable=None: only on a terminal

    def update(progress) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{progress.loss:.4g}", refresh=False)
        if progress.step == progress.total:
            bar.close()

    return update


@contextlib.contextmanager
def _graceful_interrupt():
    """The first Ctrl-C asks the run to stop at its next check (so it can keep a resumable checkpoint); a second one
    interrupts at once."""
    requested = []

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        print("\nstopping after this step (Ctrl-C again to quit at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(requested)
    finally:
        signal.signal(signal.SIGINT, previous)


# --- plan: the memory planner -------------------------------------------------------------------------------------

DEFAULT_BUDGETS_GIB = (16.0, 24.0)
TABLE_FAMILIES = ("sd1", "sdxl")


def _add_plan_parser(sub) -> None:
    plan = sub.add_parser(
        "plan", help="estimate the memory an erasure needs on its device, part by part, and which options fit",
        description="Builds the family's real UNet on the meta device and measures what a run allocates "
                    "(nothing is downloaded or loaded).")
    plan.add_argument("--family", choices=("sd1", "sd2", "sdxl"), help="model family (required unless --table)")
    plan.add_argument("--method", default=Method.ESD_X.value, help="layer method, as for erase")
    plan.add_argument("--dtype", choices=DTYPES, default="fp32",
                      help="storage dtype of the weights; on CUDA bf16/fp16 also compute under autocast")
    plan.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="device to plan for")
    plan.add_argument("--resolution", type=int, default=0, help="pixels; 0 = the family's native size")
    plan.add_argument("--gradient-checkpointing", action="store_true")
    plan.add_argument("--optimizer", choices=("adam", "adamw8bit", "adafactor"), default="adam")
    plan.add_argument("--lora-rank", type=int, default=0, help="train LoRA factors of this rank (0 = the weights)")
    plan.add_argument("--erase-from", action="store_true", help="plan a run with --erase-from (teacher batch 3)")
    plan.add_argument("--trajectory-pool", type=int, default=0,
                      help="P trajectories sampled at once: their latents are kept, sampling runs at batch 2P")
    plan.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps (latents per pooled trajectory)")
    plan.add_argument("--sample-with", choices=[s.value for s in SampleWith], default=SampleWith.TRAINED.value,
                      help="frozen: a pool also keeps the frozen teacher's predictions")
    plan.add_argument("--budget", type=float, action="append",
                      help="device memory in GiB to check against (repeatable; default 16 and 24)")
    plan.add_argument("--table", action="store_true",
                      help="print the README's tables instead: SD1.5 and SDXL, every method, fp32/bf16, "
                           "with and without checkpointing, and the options that fit 16 and 24 GiB")


def run_plan(args: argparse.Namespace) -> int:
    from .plan import GIB, PlanSettings, fitting_options

    if args.table:
        print(_plan_tables())
        return 0
    if not args.family:
        raise ESDError("plan needs --family sd1|sd2|sdxl (or --table)")
    import torch

    config = ESDConfig(concepts=("memory plan",), method=args.method, resolution=args.resolution,
                       optimizer=args.optimizer, lora_rank=args.lora_rank, trajectory_pool=args.trajectory_pool,
                       ddim_steps=args.ddim_steps, sample_with=args.sample_with,
                       erase_from=("a broader concept",) if args.erase_from else ())
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    settings = PlanSettings.for_run(config, args.gradient_checkpointing, dtype, args.device)
    plan = _planner(args.family).plan(settings)
    print(plan.format())
    for budget in args.budget or DEFAULT_BUDGETS_GIB:
        limit = int(budget * GIB)
        if plan.total <= limit:
            print(f"{budget:g} GiB: fits")
            continue
        options = fitting_options(plan, limit)
        fits = "; ".join(o.describe() for o in options) if options else "nothing the planner knows"
        print(f"{budget:g} GiB: does not fit; options that fit: {fits}")
    return 0


def _planner(family: str):
    """A planner for a named family: its measurements are shared by everything planned with it."""
    from .adapter import ModelFamily
    from .plan import Planner, architecture_memory_model

    return Planner(architecture_memory_model(ModelFamily(family)))


#: The README's targets: (family, method, budget in GiB).
PLAN_TARGETS = (("sd1", "esd-u", 16.0), ("sdxl", "esd-x", 24.0))


def _plan_tables() -> str:
    """The README's memory tables (markdown)."""
    from .plan import GIB, PlanSettings, fitting_options

    def gib(n: int) -> str:
        return f"{n / GIB:.1f}"

    def leanest(plan, budget: float, limit: int):
        """The plan itself if it fits, else the recommended option sets."""
        if plan.total <= budget * GIB:
            return []
        return fitting_options(plan, int(budget * GIB), limit=limit)

    planners = {family: _planner(family) for family in TABLE_FAMILIES}
    variants = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]
    totals = ["| model | method | weights trained | fp32 | fp32 + checkpointing | bf16 | bf16 + checkpointing |",
              "|---|---|---:|---:|---:|---:|---:|"]
    advice = ["| model | method | as planned (fp32) | " + " | ".join(
        f"{b:g} GiB: leanest changes that fit" for b in DEFAULT_BUDGETS_GIB) + " |", "|---|---|---:|---|---|"]
    for family, planner in planners.items():
        for method in Method:
            plans = [planner.plan(PlanSettings(method, dtype, gradient_checkpointing=ckpt)) for dtype, ckpt in variants]
            label = f"{plans[0].label} {plans[0].resolution} px"
            totals.append(f"| {label} | {method.value} | {plans[0].trained_numel:,} | "
                          + " | ".join(gib(p.total) for p in plans) + " |")
            cells = []
            for budget in DEFAULT_BUDGETS_GIB:
                options = leanest(plans[0], budget, limit=2)
                fits = plans[0].total <= budget * GIB
                cells.append("fits as planned" if fits else "; ".join(
                    f"{' + '.join(o.changes)} ({gib(o.plan.total)})" for o in options) or "none")
            advice.append(f"| {label} | {method.value} | {gib(plans[0].total)} | " + " | ".join(cells) + " |")

    targets = []
    for family, method, budget in PLAN_TARGETS:
        plan = planners[family].plan(PlanSettings(method))
        options = leanest(plan, budget, limit=1)
        targets.append((budget, options[0].plan if options else plan))
    parts = ["| part | " + " | ".join(f"{p.label} {p.resolution} px in {b:g} GiB: {p.settings.describe()}"
                                     for b, p in targets) + " |", "|---|" + "---:|" * len(targets)]
    for name, attribute in (("weights", "weights"), ("trained tensors", "trained"), ("gradients", "gradients"),
                            ("optimizer state", "optimizer_state"), ("working set, the largest of:", "working_set"),
                            ("&nbsp;&nbsp;training step", "training_step"),
                            ("&nbsp;&nbsp;&nbsp;&nbsp;of which kept for backward", "saved_activations"),
                            ("&nbsp;&nbsp;sampling forward (batch 2)", "sampling"),
                            ("&nbsp;&nbsp;optimizer step", "optimizer_step"), ("overhead", "overhead"),
                            ("**total**", "total")):
        parts.append(f"| {name} | " + " | ".join(gib(getattr(p, attribute)) for _, p in targets) + " |")
    return "\n".join(["Total GiB on a CUDA device, Adam, the family's native resolution:", "", *totals, "",
                      "Option sets that fit, from fp32 with Adam (recommended first):", "", *advice, "",
                      "The two targets with the recommended options, part by part (GiB):", "", *parts])
