"""Why one learning rate erases differently in the SD1.5-shaped toy (`comfy_toy`) than in the toy itself.

The embedding computes the toy's function with every toy weight spread over copies: a layer reading k copies of a
toy channel holds the toy's weight divided by k in each. Adam moves every weight by about the learning rate whatever
its gradient's scale (its first step is exactly ``lr * sign(gradient)``), and the copies get equal gradients, so
they stay copies and the toy weight they stand for moves by k times the learning rate. The same learning rate
therefore acts k times larger in the embedding, with k per kind of tensor (12 for the key and value projections,
which read CLIP-L's copies of the toy's text features; 10 channel copies for the query, divided by its softmax scale;
4 head copies for the output projection; 1 for a bias).

    python -m esd_bench.embedding_steps [--lr 5e-4] [--emulate 4e-5 ...]

1. One ESD iteration with the demo's settings (seed 0) on the toy and on its embedding (both in diffusers, the same
   function and the same x_t), the embedding's change mapped back to toy space (`comfy_toy.toy_space`): per trained
   tensor kind, the ratio of the two changes, i.e. the measured factor k.
2. ``--emulate L``: the demo's erasure on the toy with per-tensor learning rates k * L, which is what the embedding
   (ComfyUI's toy checkpoint) does at learning rate L, at the toy's compute (the embedding costs 100x more per
   pass): the detector's before/after rates, as `make demo` prints them.
"""
from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence
from unittest import mock

import torch

from esd_core.adapter import BaseModelInfo
from esd_core.diffusers_adapter import DiffusersSDAdapter, quiet_hf_logging
from esd_core.trainer import erase, ldm_names

from . import comfy_toy, demo
from .erasure import ToyErasure
from .evaluate import SamplingConfig, build_pipeline, load_toy_pipeline

#: The trained tensor kinds of ESD-x, by a pattern on their (diffusers) names.
KINDS = {"to_q.weight": r"attn2\.to_q\.weight$", "to_k.weight": r"attn2\.to_k\.weight$",
         "to_v.weight": r"attn2\.to_v\.weight$", "to_out.weight": r"attn2\.to_out\.0\.weight$",
         "to_out.bias": r"attn2\.to_out\.0\.bias$"}


def kind_of(name: str) -> str:
    return next(k for k, pattern in KINDS.items() if re.search(pattern, name))


def embedded_pipeline(toy=None):
    """The toy pipeline's SD1.5-shaped embedding as a diffusers pipeline (the toy's tokenizer and scheduler)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    toy = toy or load_toy_pipeline()
    unet_state, text_state, vae_state = comfy_toy.expand_pipeline(toy.unet, toy.text_encoder, toy.vae)
    unet = UNet2DConditionModel(**comfy_toy.unet_big_config(dict(toy.unet.config)))
    unet.load_state_dict(unet_state)
    cfg = toy.text_encoder.config
    text = CLIPTextModel(CLIPTextConfig(**comfy_toy.CLIP_L, bos_token_id=cfg.bos_token_id,
                                        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id))
    text.load_state_dict(text_state, strict=False)  # position_ids are a buffer the state dict may lack
    vae = AutoencoderKL(**comfy_toy.vae_big_config(dict(toy.vae.config)))
    vae.load_state_dict(vae_state)
    return build_pipeline(unet.eval(), text.eval(), vae.eval(), toy.tokenizer, toy.scheduler)


def measured_factors(erasure: ToyErasure) -> dict[str, float]:
    """Per trained tensor (toy names): how many times the toy weight moved in the embedding, relative to the toy's
    own move, after one ESD iteration with the same seed (norm of the change in toy space over the toy's)."""
    toy = load_toy_pipeline()
    one = erasure.but(iterations=1).config()
    toy_adapter = DiffusersSDAdapter(toy, BaseModelInfo("toy"))
    toy_diffs = erase(toy_adapter, one).diffs
    big = embedded_pipeline(toy)
    big_diffs = erase(DiffusersSDAdapter(big, BaseModelInfo("embedded toy")), one).diffs
    # the results are keyed by LDM names; both models share the diffusers layout, so map through the toy's names
    to_diffusers = {ldm: n for n, ldm in ldm_names(toy_adapter).items()}
    big_changes = {to_diffusers[k]: v for k, v in big_diffs.items()}
    in_toy_space = comfy_toy.toy_space(toy.unet, big_changes, comfy_toy.text_layout(toy.text_encoder.config.hidden_size))
    return {to_diffusers[k]: float(in_toy_space[to_diffusers[k]].norm() / v.norm()) for k, v in toy_diffs.items()}


@contextmanager
def per_tensor_learning_rates(factors: dict[str, float]):
    """Within the block the trainer's optimizer is Adam with a learning rate per trained parameter of the toy: the
    run's learning rate times the parameter's factor (by diffusers name)."""
    from esd_core import trainer

    trained_unet = []
    make_trainables = trainer.make_trainables

    def remembering(config, unet):
        trained_unet[:] = [unet]
        return make_trainables(config, unet)

    def adam_per_tensor(name, params, lr, device):
        names = {id(p): n for n, p in trained_unet[0].named_parameters()}
        return torch.optim.Adam([{"params": [p], "lr": lr * factors[names[id(p)]]} for p in params], lr=lr)

    with mock.patch.object(trainer, "make_trainables", remembering), \
            mock.patch.object(trainer, "make_optimizer", adam_per_tensor):
        yield


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default=demo.DEFAULT_CONCEPT)
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate of the one-iteration comparison")
    parser.add_argument("--emulate", type=float, nargs="*", default=[],
                        help="learning rates of the embedding to emulate on the toy (the demo's erasure)")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt for the emulated erasures")
    args = parser.parse_args(argv)
    quiet_hf_logging()
    torch.set_num_threads(1)
    erasure = ToyErasure(concept=args.concept, learning_rate=args.lr)
    factors = measured_factors(erasure)
    print(f"One ESD iteration ({erasure.label()}): the embedding's change in toy space over the toy's, per tensor "
          "kind (median over layers; min-max):\n")
    print("| tensor | factor | range |\n|---|---:|---:|")
    by_kind: dict[str, list[float]] = {}
    for name, f in factors.items():
        by_kind.setdefault(kind_of(name), []).append(f)
    for kind, values in by_kind.items():
        print(f"| attn2.{kind} | {statistics.median(values):.2f} | {min(values):.2f}-{max(values):.2f} |")
    for lr in args.emulate:
        print(f"\nThe demo's erasure on the toy with each tensor's learning rate = its factor x {lr:g} (what the "
              f"embedding does at learning rate {lr:g}):")
        with per_tensor_learning_rates(factors), tempfile.TemporaryDirectory() as out:
            demo.run(erasure.but(learning_rate=lr), args.n, Path(out), SamplingConfig(num_inference_steps=20))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
