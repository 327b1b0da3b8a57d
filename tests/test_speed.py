"""The speed/memory benchmark harness end to end on the tiny model (2 measured iterations per row: this proves the
harness and what it writes, not the figures), and the marked sections of a generated markdown file."""
import json
import re

import pytest
import torch

from esd_bench import speed
from esd_bench.markdown import markers, replace_section


#: Rows the end-to-end test runs in subprocesses (~10 s each, mostly importing torch and diffusers); the other modes
#: run in-process below.
END_TO_END = ("baseline-issue", "baseline-code", "default", "checkpointing", "bf16")


def cells_of(section: str) -> dict[str, list[str]]:
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0] in {m.label for m in speed.MODES}:
            rows[cells[0]] = cells
    return rows


def test_harness_writes_its_rows_and_the_scaling_tables(tmp_path, monkeypatch):
    out, js = tmp_path / "BENCHMARKS.md", tmp_path / "speed.json"  # js: the rows' results, reused by a second run
    out.write_text("# Benchmarks\n\n<!-- esd_bench.benchmark:begin -->\nquality figures\n<!-- esd_bench.benchmark:end -->\n")
    # The scaling tables' points are rows the harness has already run, which it reuses.
    argv = ["--models", "tiny", "--methods", "esd-x", "--modes", ",".join(END_TO_END), "--iterations", "2",
            "--warmup", "1", "--ddim-steps", "4", "--scaling-model", "tiny", "--scaling-modes",
            "baseline-issue,default", "--ddim-sweep", "4", "--resolution-sweep", "64", "--method-sweep", "esd-x",
            "--out", str(out), "--results", str(js)]
    assert speed.main(argv) == 0
    text = out.read_text()
    assert "<!-- esd_bench.benchmark:begin -->\nquality figures\n<!-- esd_bench.benchmark:end -->" in text
    section = text.split("<!-- esd_bench.speed:begin -->\n")[1].split("<!-- esd_bench.speed:end -->")[0]
    assert "`python -m esd_bench.speed --models tiny" in section and "--results" not in section
    assert "one torch thread" in section and "against the baseline (the issue's definition): time" in section

    rows = cells_of(section)
    assert list(rows) == [speed.MODES_BY_KEY[k].label for k in END_TO_END]  # one row per mode, in order, none failed
    number = re.compile(r"^\d+(\.\d+)?(e[-+]\d+)?$")
    for label, cells in rows.items():
        assert number.match(cells[1]) and number.match(cells[3]), cells          # CPU and wall s/it
        assert re.match(r"^\d+ MiB$|^\d+\.\d\d GiB$", cells[4]), cells          # peak RSS
        if label in {speed.MODES_BY_KEY[k].label for k in speed.BASELINES}:
            assert cells[2] == "-"
        else:
            assert re.match(r"^\d+\.\d\d / \d+\.\d\d$", cells[2]), cells       # ratios to both baselines
    # The float32 modes erase exactly what the baseline erases; bf16 rounds differently.
    weights = {label: float(cells[8]) for label, cells in rows.items() if cells[8] != "-"}
    for key in ("default", "checkpointing", "baseline-code"):
        assert weights[speed.MODES_BY_KEY[key].label] < 2e-3, (key, weights)
    assert weights[speed.MODES_BY_KEY["bf16"].label] > 10 * weights[speed.MODES_BY_KEY["default"].label]
    assert "With the number of DDIM steps for x_t" in section and re.search(r"^\| 4 \| 24,736 \| ", section, re.M)
    assert "With the resolution" in section and "| 64 px |" in section and "| esd-x | " in section

    # What the forward hooks counted per iteration: the same x_t work in every mode, batched or not.
    measured = {m["job"]["mode"]: m for m in json.loads(js.read_text())}
    assert set(measured) == set(END_TO_END)  # every job ran once
    calls = {mode: measured[mode]["phase_calls"] for mode in ("baseline-issue", "baseline-code", "default")}
    rows_ = {mode: measured[mode]["phase_rows"] for mode in calls}
    assert rows_["baseline-issue"]["sampling"] == rows_["default"]["sampling"] == rows_["baseline-code"]["sampling"]
    assert calls["baseline-issue"]["sampling"] == 2 * calls["default"]["sampling"]  # two passes per guided step
    assert (calls["baseline-issue"]["teacher"], calls["default"]["teacher"]) == (2, 1)
    assert rows_["baseline-issue"]["teacher"] == rows_["default"]["teacher"] == 2
    assert all(c["student"] == 1 for c in calls.values())
    assert (calls["baseline-code"]["text"], calls["default"]["text"]) == (4, 0)  # prompts re-encoded, or not at all
    for m in measured.values():
        assert m["peak_bytes"] >= m["loaded_bytes"] > 0 and m["clock"] == "CPU"
        assert m["phase_seconds"]["sampling"] > 0 and len(m["iteration_seconds"]) == 2

    # Run again with the same results file: every row is reused (none runs), the section comes out the same.
    out.write_text("")
    started = []
    monkeypatch.setattr(speed, "spawn", lambda job, diffs_file: started.append(job))
    assert speed.main(argv) == 0 and started == []
    assert cells_of(out.read_text()) == rows

    # --reuse-only: a row missing from the results file is shown as not run, and nothing runs.
    modes = argv.index("--modes") + 1
    again = [*argv[:modes], argv[modes] + ",lora", *argv[modes + 1:], "--reuse-only"]
    assert speed.main(again) == 0 and started == []
    text = out.read_text()
    assert f"| {speed.MODES_BY_KEY['lora'].label} | failed: not run (--reuse-only) |" in text
    assert "--reuse-only" not in text.split("Generated by `")[1].split("`")[0]


@pytest.mark.parametrize("mode", [m.key for m in speed.MODES if m.key not in END_TO_END])
def test_every_other_mode_runs_and_is_measured(mode, tmp_path):
    fast = mode == "fast"
    job = speed.Job(model="tiny", mode=mode, method="esd-x", device="cpu", resolution=64, ddim_steps=4,
                    warmup=1, iterations=4 if fast else 2)  # fast: one cycle of its pool (1 trajectory x 4 latents)
    m = speed.run_job(job, str(tmp_path / "diffs.safetensors"))
    assert len(m.iteration_seconds) == job.iterations and m.seconds_per_iteration > 0
    assert m.peak_bytes >= m.loaded_bytes > 0 and (tmp_path / "diffs.safetensors").exists()
    if fast:  # one refill in the cycle: 4 guided steps of the frozen model, the teacher recorded meanwhile
        assert m.phase_calls["sampling"] * job.iterations == 4 and m.phase_calls["teacher"] == 0
    else:  # the baseline's teacher is two passes, the trainer's one
        assert m.phase_calls["teacher"] == (2 if speed.MODES_BY_KEY[mode].baseline else 1)
        assert m.phase_calls["student"] == 1
    assert torch.backends.mkldnn.enabled  # a row's oneDNN setting does not outlive it


def test_the_fast_row_is_the_trainers_fast_mode_for_each_method():
    from esd_core.config import ESDConfig, SampleWith, fast

    spec, mode = speed.MODELS["toy"], speed.MODES_BY_KEY["fast"]
    for method in ("esd-x", "esd-u"):
        config = speed.row_config(mode, spec, method, ddim_steps=50, resolution=64, iterations=12)
        plain = ESDConfig(concepts=(spec.concept,), method=method, iterations=12, ddim_steps=50, resolution=64,
                          seed=spec.seed)
        assert config == fast(plain) != plain
    x = speed.row_config(mode, spec, "esd-x", 50, 64, 12)
    u = speed.row_config(mode, spec, "esd-u", 50, 64, 12)
    assert (x.trajectory_pool, x.sample_with, x.ddim_steps) == (1, SampleWith.FROZEN, 50)
    assert (u.trajectory_pool, u.ddim_steps) == (0, 10)


def test_a_section_is_created_appended_replaced_and_nothing_else_changes(tmp_path):
    path = tmp_path / "sub" / "B.md"
    replace_section(path, "one", "first")
    assert path.read_text().startswith("# Benchmarks") and "<!-- one:begin -->\nfirst\n<!-- one:end -->" in path.read_text()
    replace_section(path, "two", "second")
    replace_section(path, "one", "first, again\n")
    text = path.read_text()
    assert "<!-- one:begin -->\nfirst, again\n<!-- one:end -->" in text and text.count("first") == 1
    assert text.index("one:begin") < text.index("two:begin") and "<!-- two:begin -->\nsecond\n<!-- two:end -->" in text


@pytest.mark.parametrize("broken", ["{b}\nx\n", "{e}\nx\n{b}\n", "{b}\n{e}\n{b}\n{e}\n"])
def test_broken_markers_are_refused_and_the_file_is_kept(tmp_path, broken):
    begin, end = markers("one")
    path = tmp_path / "B.md"
    path.write_text(broken.format(b=begin, e=end))
    before = path.read_text()
    with pytest.raises(ValueError, match="markers of section 'one' are broken"):
        replace_section(path, "one", "new")
    assert path.read_text() == before and list(tmp_path.iterdir()) == [path]
