"""Print, as JSON, the parameter names and shapes of ComfyUI's own LDM UNet (comfy.ldm...openaimodel.UNetModel, the
module layout A1111 and Forge also use: A1111 builds SD1 from `ldm`, SDXL from `sgm`, with these names) for the real
SD1.5 or SDXL architecture, built on the meta device (no memory, no weights).

    python tests/host/ldm_layout.py --comfy .comfyhost/ComfyUI --family sdxl

Runs in its own process, since importing ComfyUI parses its command line (tests call it with subprocess).
"""
import argparse
import json
import sys

_COMMON = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, use_spatial_transformer=True,
               legacy=False, use_checkpoint=False, use_temporal_resblock=False, use_temporal_attention=False)
# transformer_depth_output runs from the last output block to output_blocks.0 (UNetModel pops it from the end).
FAMILIES = {
    "sd15": dict(channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1] * 9 + [0] * 3, transformer_depth_middle=1, context_dim=768,
                 num_heads=8, use_linear_in_transformer=False, adm_in_channels=None),
    "sdxl": dict(channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                 context_dim=2048, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=2816,
                 num_classes="sequential"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--family", choices=sorted(FAMILIES), required=True)
    a = ap.parse_args()
    sys.path.insert(0, a.comfy)
    sys.argv = sys.argv[:1]  # comfy.cli_args must not parse our flags
    from comfy.cli_args import args
    args.cpu = True
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**_COMMON, **FAMILIES[a.family], device="meta", operations=comfy.ops.disable_weight_init)
    print(json.dumps({n: list(p.shape) for n, p in unet.named_parameters()}))


if __name__ == "__main__":
    main()
