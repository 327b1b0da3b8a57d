"""LoRA training: adapters on the method's Linear/Conv2d layers, the frozen base untouched, one model copy."""
import pytest
import torch

from esd_core.config import ESDConfig
from esd_core.errors import ConfigError
from esd_core.lora import LoRAAdapters, LoRAFactors
from esd_core.trainer import erase

FAST = dict(ddim_steps=4, seed=0)


def predictions(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = adapter.encode_prompts(["a cat", ""])
    with torch.no_grad():
        return adapter.predict_noise(x, torch.tensor([500, 100]), cond)


@pytest.mark.parametrize("layer", [torch.nn.Linear(6, 5), torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)])
def test_a_hooked_layer_computes_its_weight_plus_the_factors_delta(layer):
    adapters = LoRAAdapters({"layer": layer}, rank=2, alpha=3.0, seed=1)
    with torch.no_grad():
        adapters.up["layer"].normal_()
    x = torch.randn(2, 6) if isinstance(layer, torch.nn.Linear) else torch.randn(2, 3, 7, 7)

    def plain(weight):
        if isinstance(layer, torch.nn.Linear):
            return torch.nn.functional.linear(x, weight, layer.bias)
        return torch.nn.functional.conv2d(x, weight, layer.bias, stride=2, padding=1)

    delta = adapters.factors()["layer"].delta()
    assert delta.abs().max() > 0
    torch.testing.assert_close(layer(x), plain(layer.weight + delta), rtol=1e-5, atol=1e-5)
    assert adapters.factors()["layer"].scale == 1.5
    with adapters.frozen():  # teacher passes see the layer alone
        assert torch.equal(layer(x), plain(layer.weight))
    adapters.restore()
    assert not layer._forward_hooks


def test_lora_training_leaves_the_base_exactly_and_returns_factors_of_the_methods_layers(tiny_adapter):
    before = predictions(tiny_adapter)
    weights = {n: p.detach().clone() for n, p in tiny_adapter.unet.named_parameters()}
    result = erase(tiny_adapter, ESDConfig(concepts=("a cat",), iterations=10, learning_rate=1e-2, lora_rank=2,
                                           **FAST))
    assert not result.diffs and result.loras
    assert all(".attn2." in path for path in result.loras)  # esd-x: cross-attention layers only
    modules = dict(tiny_adapter.unet.named_modules())
    from esd_core.trainer import ldm_names
    to_ldm = {ldm.rpartition(".")[0]: n.rpartition(".")[0] for n, ldm in ldm_names(tiny_adapter).items()}
    for path, factors in result.loras.items():
        weight = modules[to_ldm[path]].weight
        assert factors.weight_shape == weight.shape and factors.rank == 2
    assert any(f.delta().abs().max() > 0 for f in result.loras.values())
    assert result.trained_numel == sum(f.down.numel() + f.up.numel() for f in result.loras.values())
    # the model is exactly as received: weights, and no hook left behind
    assert all(torch.equal(p, weights[n]) for n, p in tiny_adapter.unet.named_parameters())
    assert not any(m._forward_hooks for m in tiny_adapter.unet.modules())
    assert torch.equal(predictions(tiny_adapter), before)


def test_esd_u_lora_adapts_convolutions_in_the_loaders_layout(tiny_adapter):
    result = erase(tiny_adapter, ESDConfig(concepts=("a cat",), iterations=2, learning_rate=1e-3, method="esd-u",
                                           lora_rank=3, **FAST))
    convs = {p: f for p, f in result.loras.items() if f.down.dim() == 4}
    assert convs, "esd-u includes the ResNets' convolutions"
    f = convs["input_blocks.1.0.in_layers.2"]  # the first ResNet's 3x3 conv
    assert f.down.shape == (3, 32, 3, 3) and f.up.shape == (32, 3, 1, 1)
    assert not any(".attn2." in p for p in result.loras)


def test_restore_false_merges_the_adapters_into_the_weights(tiny_adapter):
    base = {n: p.detach().clone() for n, p in tiny_adapter.unet.named_parameters()}
    result = erase(tiny_adapter, ESDConfig(concepts=("a cat",), iterations=4, learning_rate=1e-2, lora_rank=2,
                                           **FAST), restore=False)
    from esd_core.trainer import ldm_names
    to_ldm = ldm_names(tiny_adapter)
    for n, p in tiny_adapter.unet.named_parameters():
        path = to_ldm[n].rpartition(".")[0]
        if n.endswith(".weight") and path in result.loras:
            torch.testing.assert_close(p.data, base[n] + result.loras[path].delta())
        else:
            assert torch.equal(p.data, base[n])
    assert not any(m._forward_hooks for m in tiny_adapter.unet.modules())


def test_a_rank_larger_than_a_layer_allows_is_refused_before_training(tiny_adapter):
    with pytest.raises(ConfigError, match="larger than layer .* allows"):
        erase(tiny_adapter, ESDConfig(concepts=("a cat",), iterations=1, lora_rank=10_000, **FAST))


def test_factors_delta_is_scaled_by_alpha_over_rank():
    down, up = torch.randn(2, 3), torch.randn(4, 2)
    f = LoRAFactors(down=down, up=up, alpha=1.0)
    torch.testing.assert_close(f.delta(), 0.5 * up @ down)


class PlainLinear(torch.nn.Module):
    """A linear layer that is not a torch.nn.Linear subclass, as Forge's ops build them."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features))
        self.bias = None

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def test_linear_layers_that_are_not_subclasses_are_adapted_too():
    from esd_core.lora import is_adaptable

    layer = PlainLinear(6, 5)
    assert is_adaptable(layer) and is_adaptable(torch.nn.Linear(2, 3))
    assert not is_adaptable(torch.nn.LayerNorm(6)) and not is_adaptable(torch.nn.Embedding(4, 6))
    adapters = LoRAAdapters({"layer": layer}, rank=2, alpha=2.0, seed=1)
    with torch.no_grad():
        adapters.up["layer"].normal_()
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), x @ (layer.weight + adapters.factors()["layer"].delta()).T,
                               rtol=1e-5, atol=1e-5)
    adapters.restore()
