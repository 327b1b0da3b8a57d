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


def test_file_formats_section_replaces_only_its_own_part(tmp_path):
    from esd_bench.file_formats import SECTION, replace_section
    from esd_bench.markdown import markers

    begin, end = markers(SECTION)
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Bench\n\nother generator's tables\n")
    replace_section(path, SECTION, "first")
    assert path.read_text().startswith("# Bench\n\nother generator's tables") and f"{begin}\nfirst\n{end}" in path.read_text()
    path.write_text(path.read_text() + "\ntrailing section\n")
    replace_section(path, SECTION, "second")
    text = path.read_text()
    assert "first" not in text and "second" in text and text.endswith("trailing section\n")
    assert text.count(begin) == 1


def test_deviation_compares_module_by_module():
    from esd_bench.file_formats import deviation

    g = torch.Generator().manual_seed(0)
    full = ErasedWeights.from_diffs(make_header(), {"a.weight": torch.randn(64, generator=g),
                                                    "b.weight": 100 * torch.randn(64, generator=g)})
    assert deviation(full, full.cast(torch.float32)) == (0.0, 0.0, 0.0)
    reordered = ErasedWeights(full.header, dict(reversed(list(full.cast(torch.float16).modules.items()))))
    big, rel, mean_rel = deviation(full, reordered)
    assert 0 < rel <= 2 ** -11 and 0 < mean_rel <= 2 ** -11  # fp16 rounds to nearest: half an ulp at most
