"""The size table's arithmetic: safetensors' layout computed from shapes equals the bytes of files the pack writes."""
import torch
from safetensors.torch import save_file

from esd_bench.file_sizes import safetensors_bytes
from esd_core.erased_weights import ErasedWeights
from esd_core.lora import LoRAFactors
from test_erased_weights import make_header


def test_computed_sizes_match_written_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    full = ErasedWeights.from_diffs(make_header(), {"a.b.weight": torch.randn(8, 4, 3, 3, generator=g),
                                                    "a.b.bias": torch.randn(8, generator=g),
                                                    "n.weight": torch.randn(8, generator=g)})
    lora = ErasedWeights.from_lora(make_header(), {"a.b": LoRAFactors(torch.randn(2, 4, 3, 3, generator=g),
                                                                      torch.randn(8, 2, 1, 1, generator=g), 2.0)},
                                   {"n.weight": torch.randn(8, generator=g), "n.bias": torch.randn(8, generator=g)})
    for erased, dtype in ((full, torch.float32), (full, torch.float16), (lora, torch.float16)):
        tensors = erased.cast(dtype).tensors()
        save_file(tensors, str(tmp_path / "f.safetensors"))
        on_meta = {k: t.to("meta") for k, t in tensors.items()}
        assert safetensors_bytes(on_meta) == (tmp_path / "f.safetensors").stat().st_size
        (tmp_path / "f.safetensors").unlink()
