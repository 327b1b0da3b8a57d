"""LoRA export by truncated SVD: optimality, shapes, energy, the header, dropped biases and the errors."""
import dataclasses

import pytest
import torch
from tiny import make_adapter

from esd_core.config import ESDConfig
from esd_core.erased_weights import apply_to_module, load_erased_weights, save_erased_weights
from esd_core.errors import ErasedWeightsError
from esd_core.lora_export import ExportSpec, export_lora, truncated_svd
from esd_core.testing import TinyPipelineSpec
from esd_core.trainer import erase


@pytest.fixture(scope="module")
def esd_u():
    adapter = make_adapter()
    base = {n: p.detach().clone() for n, p in adapter.unet.named_parameters()}
    config = ESDConfig(concepts=("a cat",), method="esd-u", iterations=2, learning_rate=1e-3, ddim_steps=4)
    result = erase(adapter, config, restore=False)
    return result.to_erased_weights(adapter), base


def test_truncated_svd_is_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(24, 40, generator=g)
    s = torch.linalg.svdvals(delta)
    for rank in (1, 5, 24):
        factors, kept = truncated_svd(delta, ExportSpec(rank=rank))
        assert factors.rank == rank and factors.alpha == rank and factors.down.shape == (rank, 40)
        error = (delta - factors.delta()).square().sum()
        torch.testing.assert_close(error, s[rank:].square().sum(), rtol=1e-4, atol=1e-4)  # Eckart-Young
        torch.testing.assert_close(torch.tensor(kept), s[:rank].square().sum(), rtol=1e-5, atol=0)


def test_convolutions_are_factored_as_lora_loaders_expect():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(8, 6, 3, 3, generator=g)
    factors, _ = truncated_svd(delta, ExportSpec(rank=54 // 9))
    assert factors.down.shape == (6, 6, 3, 3) and factors.up.shape == (8, 6, 1, 1)
    full, _ = truncated_svd(delta, ExportSpec(rank=8))  # full rank of the (8, 54) matrix: exact
    torch.testing.assert_close(full.delta(), delta, rtol=0, atol=1e-5)
    # the reshaped down factor is a convolution: conv(up, conv(down, x)) == conv(delta, x)
    x = torch.randn(1, 6, 5, 5, generator=g)
    y = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, full.down, padding=1), full.up)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, delta, padding=1), rtol=0, atol=1e-4)


def test_energy_picks_the_fewest_values_reaching_it():
    delta = torch.diag(torch.tensor([3.0, 2.0, 1.0]))  # energies 9, 4, 1 of 14
    assert truncated_svd(delta, ExportSpec(energy=9 / 14))[0].rank == 1
    assert truncated_svd(delta, ExportSpec(energy=0.65))[0].rank == 2
    assert truncated_svd(delta, ExportSpec(energy=1.0))[0].rank == 3


def test_export_header_dropped_biases_and_apply(tmp_path, esd_u):
    erased, base = esd_u
    lora = export_lora(erased, rank=2, source="u.safetensors")
    h = lora.header
    assert h.kind == "lora" and h.rank == 2 and h.alpha == 2.0
    assert h.export == {"rank": 2, "source": "u.safetensors", "source_kind": "full"}
    assert 0 < h.kept_energy < 1
    assert h.concepts == erased.header.concepts and h.base_tensors_hash == erased.header.base_tensors_hash
    norms = [s for s, c in erased.modules.items() if c.weight.ndim == 1]
    assert norms and all(lora.modules[s].weight is not None and lora.modules[s].bias is not None for s in norms)
    dropped = {f"{s}.diff_b" for s, c in erased.modules.items() if c.weight.ndim >= 2 and c.bias is not None}
    assert dropped and set(h.dropped) == dropped
    path = save_erased_weights(tmp_path / "lora.safetensors", lora)
    assert path.stat().st_size < 0.3 * save_erased_weights(tmp_path / "full.safetensors", erased).stat().st_size
    loaded = load_erased_weights(path)
    assert loaded.header.kept_energy == h.kept_energy and loaded.header.dropped == h.dropped
    target = make_adapter()
    assert apply_to_module(target.unet, loaded, 1.0, target.naming) is None  # same base: the hash still matches
    changed = [n for n, p in target.unet.named_parameters() if not torch.equal(p.data, base[n])]
    assert changed and not any(n.endswith("conv1.bias") for n in changed)  # dropped biases stay as they were
    other = make_adapter(TinyPipelineSpec(seed=1))
    assert "differ from the base" in apply_to_module(other.unet, loaded, 1.0, other.naming)


def test_full_energy_export_reproduces_the_weights(esd_u):
    erased, _ = esd_u
    lora = export_lora(erased, energy=1.0)
    for stem, change in erased.modules.items():
        want = change.weight.float()
        assert (lora.modules[stem].weight_delta() - want).norm() <= 1e-5 * want.norm()  # float32 round-off
    low = [c.bias for c in erased.modules.values() if c.weight.ndim >= 2 and c.bias is not None]
    bias_share = sum(float(b.square().sum()) for b in low)
    total = sum(float(c.weight.square().sum()) + (0 if c.bias is None else float(c.bias.square().sum()))
                for c in erased.modules.values())
    assert lora.header.kept_energy == pytest.approx(1 - bias_share / total, rel=1e-5)


def test_bad_export_requests_are_refused(esd_u):
    erased, _ = esd_u
    with pytest.raises(ErasedWeightsError, match="rank 33 is larger than .* allows.*at most rank 32"):
        export_lora(erased, rank=33)
    for energy in (0.0, -0.1, 1.5):
        with pytest.raises(ErasedWeightsError, match=r"energy must be in \(0, 1\]"):
            export_lora(erased, energy=energy)
    with pytest.raises(ErasedWeightsError, match="either a rank or an energy"):
        export_lora(erased, rank=2, energy=0.5)
    with pytest.raises(ErasedWeightsError, match="at least 1"):
        export_lora(erased, rank=0)
    norms_only = dataclasses.replace(erased, modules={s: c for s, c in erased.modules.items() if c.weight.ndim == 1})
    with pytest.raises(ErasedWeightsError, match="no Linear or Conv2d weight"):
        export_lora(norms_only, rank=1)
