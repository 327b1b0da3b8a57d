"""The demo and the benchmark end to end on the committed toy model, on a reduced budget (a few iterations and
sampling steps: these tests prove the pipeline and its outputs; BENCHMARKS.md measures the erasure)."""
from __future__ import annotations

import torch
from PIL import Image

from esd_bench import TOY_SD_DIR, benchmark, demo
from esd_bench.erasure import ToyErasure, erased_pipeline
from esd_bench.evaluate import SamplingConfig, load_toy_pipeline
from esd_core.erased_weights import load_erased_weights

TINY_SAMPLING = SamplingConfig(num_inference_steps=3, batch_size=16)


def test_demo_erases_and_writes_table_grid_and_weights(tmp_path, capsys):
    erasure = ToyErasure(concept=demo.DEFAULT_CONCEPT, iterations=3, ddim_steps=4)
    out = demo.run(erasure, n=2, out_dir=tmp_path, sampling=TINY_SAMPLING)
    printed = capsys.readouterr().out
    assert "| a striped background | style = striped |" in printed
    assert len(out["before"]) == len(out["after"]) == 15  # every single-attribute prompt
    grid = Image.open(out["grid"])
    # 5 prompt rows x (2 seeds before | gap | 2 seeds after) of 64 px images, shown at 2x
    assert grid.size == (2 * (2 * 2 * 64 + 8), 2 * 5 * (64 + 2))
    erased = load_erased_weights(out["weights"])
    assert erased.header.concepts == (demo.DEFAULT_CONCEPT,) and erased.header.iterations_run == 3
    assert erased.header.base_model == TOY_SD_DIR.name
    assert erased.modules and all("_attn2_" in stem for stem in erased.modules)


def test_erasure_leaves_the_base_pipeline_untouched():
    base = load_toy_pipeline()
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    pipe, result, _ = erased_pipeline(base, ToyErasure(concept="a circle", method="esd-u", iterations=2,
                                                       learning_rate=1e-3, ddim_steps=4))
    assert all(torch.equal(before[k], v) for k, v in base.unet.state_dict().items())
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(before[k], v)]
    assert changed and result.iterations_run == 2


def test_benchmark_writes_every_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n<!-- other:begin -->\nanother generator's figures\n<!-- other:end -->\n")
    argv = ["--n", "1", "--iterations", "1", "--steps", "2", "--out", str(out)]
    assert benchmark.main(argv) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\n<!-- other:begin -->\nanother generator's figures\n<!-- other:end -->\n")
    section = text.split("<!-- esd_bench.benchmark:begin -->\n")[1].split("<!-- esd_bench.benchmark:end -->")[0]
    for title in ("Object erasure with ESD-u", "Style erasure with ESD-x", "ESD-x against ESD-u",
                  "Negative guidance (eta) sweep", "Who samples x_t", "Inference-time baselines", "Robustness"):
        assert f"### {title}" in section, title
    assert "`python -m esd_bench.benchmark --n 1 --iterations 1" in section and "N = 1 samples per prompt" in section
    assert "**Bar**" in section and "| SLD (medium) |" in section and "| negative prompt |" in section


def test_benchmark_bar_needs_a_70_point_fall_or_a_full_one_and_little_drift():
    def verdicts(rows):
        return [line.endswith(": met") for line in benchmark._verdict(rows, rows).splitlines()[1:]]

    assert verdicts([(1.0, 0.25, 0.05), (0.5, 0.0, 0.02)]) == [True, True]  # 75 points; a 50% concept fell to 0
    assert verdicts([(1.0, 0.5, 0.0)]) == [False, False]                     # only 50 points
    assert verdicts([(0.5, 0.1, 0.0)]) == [False, False]                     # below 70 and not to 0
    assert verdicts([(1.0, 0.0, 0.11)]) == [False, False]                    # the others moved 11 points
