"""Layer methods: the selected sets on both namings, aliases, errors, and parameter counts of full-size SD1.5."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from esd_core.config import Method, parse_method
from esd_core.errors import ConfigError
from esd_core.keymap import diffusers_to_ldm_names
from esd_core.methods import count_trained, select_parameter_names

SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 layers_per_block=2, sample_size=64)


@pytest.fixture(scope="module")
def sd15_meta_shapes():
    """The real SD1.5 UNet's parameter (name, shape) pairs, built on the meta device (no memory, no download)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    return [(n, p.shape) for n, p in unet.named_parameters()]


def test_sd15_parameter_counts(sd15_meta_shapes):
    counts = {m: count_trained(m, sd15_meta_shapes) for m in Method}
    assert counts[Method.ESD_ALL] == 859_520_964  # the published SD1.5 UNet size
    assert 43.5e6 < counts[Method.ESD_X] < 44.5e6
    assert 19.0e6 < counts[Method.ESD_X_STRICT] < 19.5e6
    assert 812e6 < counts[Method.ESD_U] < 816e6
    # esd-u and esd-x partition the UNet except the output layer and the time embedding
    assert counts[Method.ESD_ALL] - counts[Method.ESD_U] - counts[Method.ESD_X] == sum(
        s.numel() for n, s in sd15_meta_shapes if n.startswith(("time_embedding.", "conv_out.", "conv_norm_out.")))


def test_counts_are_the_same_under_ldm_names(sd15_meta_shapes):
    to_ldm = diffusers_to_ldm_names(n for n, _ in sd15_meta_shapes)
    ldm_shapes = [(to_ldm[n], s) for n, s in sd15_meta_shapes]
    for m in Method:
        assert count_trained(m, ldm_shapes) == count_trained(m, sd15_meta_shapes), m


def test_each_method_selects_the_documented_layers(sd15_meta_shapes):
    names = [n for n, _ in sd15_meta_shapes]
    to_ldm = diffusers_to_ldm_names(names)
    for naming in ("diffusers", "ldm"):
        pool = names if naming == "diffusers" else [to_ldm[n] for n in names]
        x = select_parameter_names("esd-x", pool)
        assert x and all(".attn2." in n for n in x)
        assert len(x) == sum(".attn2." in n for n in pool)  # all of them, biases included
        strict = select_parameter_names("esd-x-strict", pool)
        assert {n.split(".attn2.")[1].split(".")[0] for n in strict} == {"to_k", "to_v"}
        u = select_parameter_names("esd-u", pool)
        assert not any(".attn2." in n for n in u)
        assert not any(n.startswith(("time_embed", "out.", "conv_out", "conv_norm_out")) for n in u)
        assert any(".attn1." in n for n in u) and any("resnets" in n or "in_layers" in n for n in u)
        assert set(select_parameter_names("selfattn", pool)) == {n for n in pool if ".attn1." in n}
        assert select_parameter_names("esd-all", pool) == pool


def test_selection_agrees_across_namings(sd15_meta_shapes):
    names = [n for n, _ in sd15_meta_shapes]
    to_ldm = diffusers_to_ldm_names(names)
    for m in Method:
        assert {to_ldm[n] for n in select_parameter_names(m, names)} == set(
            select_parameter_names(m, [to_ldm[n] for n in names])), m


def test_sdxl_label_embedding_is_not_trained_by_esd_u():
    names = ["label_emb.0.0.weight", "add_embedding.linear_1.weight", "input_blocks.1.0.in_layers.2.weight"]
    assert select_parameter_names("esd-u", names) == ["input_blocks.1.0.in_layers.2.weight"]


@pytest.mark.parametrize("alias,method", [("xattn", Method.ESD_X), ("noxattn", Method.ESD_U),
                                          ("full", Method.ESD_ALL), ("selfattn", Method.SELFATTN),
                                          ("xattn-strict", Method.ESD_X_STRICT), ("ESD-X", Method.ESD_X)])
def test_paper_code_aliases(alias, method):
    assert parse_method(alias) is method


def test_unknown_method_names_the_valid_choices():
    with pytest.raises(ConfigError) as e:
        parse_method("esd-q")
    for valid in ("esd-x", "esd-x-strict", "esd-u", "esd-all", "selfattn", "noxattn"):
        assert valid in str(e.value)


def test_method_selecting_nothing_is_an_error():
    with pytest.raises(ConfigError, match="selects no parameter"):
        select_parameter_names("esd-x", ["encoder.layers.0.weight", "decoder.bias"])
