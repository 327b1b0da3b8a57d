"""The memory planner on ComfyUI's own UNet, inside the real ComfyUI (imported in this process), for
test_plan_comfy.py. Run as a script; prints one JSON object per checkpoint.

    python plan_comfy_probe.py COMFY_DIR PACK_DIR [--pytorch-attention] CHECKPOINT...

For each checkpoint (loaded by ComfyUI's own loader): the meta copy's parameters against the loaded model's, the
checkpoint units found, and the planner's CPU activation figure against the bytes a real CPU forward of the loaded
UNet saves for backward (the trainer's layout: esd-x trained, the rest frozen).
"""
import importlib
import importlib.util
import json
import sys


def main(comfy_dir: str, pack_dir: str, pytorch_attention: bool, checkpoints: list[str]) -> None:
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0]]  # comfy.cli_args must not parse our arguments
    from comfy.cli_args import args

    args.cpu = True
    args.use_pytorch_cross_attention = pytorch_attention
    import comfy.sd
    import torch

    # the pack as ComfyUI imports it: a package (its modules use relative imports)
    spec = importlib.util.spec_from_file_location("esd_pack", f"{pack_dir}/__init__.py",
                                                  submodule_search_locations=[pack_dir])
    sys.modules["esd_pack"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["esd_pack"])
    comfy_model = importlib.import_module("esd_pack.nodes.comfy_model")
    plan = importlib.import_module("esd_pack.esd_core.plan")
    methods = importlib.import_module("esd_pack.esd_core.methods")

    for path in checkpoints:
        patcher, clip, _, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=True)
        model = comfy_model.memory_model(patcher, clip)
        real = patcher.model.diffusion_model
        side = 8
        planned = plan.plan_memory(model, plan.PlanSettings("esd-x", "fp32", "cpu", resolution=8 * side))

        real.requires_grad_(False)
        trained = set(methods.select_parameter_names("esd-x", [n for n, _ in real.named_parameters()]))
        saved = {}

        def pack(t):
            if t.untyped_storage()._cdata not in params:
                saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        config = patcher.model.model_config.unet_config
        adm = config.get("adm_in_channels")
        with torch.inference_mode(False):
            for n, p in real.named_parameters():  # ComfyUI loads under inference mode: plain copies to train on
                p.data = p.data.float().clone()
                p.requires_grad_(n in trained)
            params = {p.untyped_storage()._cdata for p in real.parameters()}
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = real(torch.randn(1, 4, side, side), torch.full((1,), 500.0),
                           context=torch.randn(1, 77, config["context_dim"]),
                           y=torch.randn(1, adm) if adm else None)
        print(json.dumps({
            "checkpoint": path,
            "meta_parameters": [[n, list(p.shape)] for n, p in model.unet.named_parameters()],
            "real_parameters": [[n, list(p.shape)] for n, p in real.named_parameters()],
            "units": sorted({type(u).__name__ for u in model.checkpoint_units(model.unet)}),
            "text_encoder_parameters": model.text_encoder_parameters,
            "real_text_encoder_parameters": sum(p.numel() for p in clip.cond_stage_model.parameters()),
            "planned_saved": planned.saved_activations,
            "real_saved": sum(saved.values()) + out.untyped_storage().nbytes(),
            "planned_total": planned.total,
        }))


if __name__ == "__main__":
    flag = "--pytorch-attention" in sys.argv
    rest = [a for a in sys.argv[1:] if a != "--pytorch-attention"]
    main(rest[0], rest[1], flag, rest[2:])
