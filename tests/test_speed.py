"""The speed/memory benchmark harness end to end on the tiny model (2 measured iterations per row: this proves the
harness and what it writes, not the figures), and the marked sections of a generated markdown file."""
import json
import re

import pytest

from esd_bench import speed
from esd_bench.markdown import markers, replace_section


def test_harness_writes_every_mode_and_the_scaling_tables(tmp_path):
    out, js = tmp_path / "BENCHMARKS.md", tmp_path / "speed.json"
    out.write_text("# Benchmarks\n\n<!-- esd_bench.benchmark:begin -->\nquality figures\n<!-- esd_bench.benchmark:end -->\n")
    # One subprocess per mode (8 on CPU, ~10 s each, mostly importing torch and diffusers); the scaling tables' points are
    # chosen to be rows the harness has already run, which it reuses.
    argv = ["--models", "tiny", "--methods", "esd-x", "--iterations", "2", "--warmup", "1", "--ddim-steps", "4",
            "--scaling-model", "tiny", "--scaling-modes", "baseline-issue,default", "--ddim-sweep", "4",
            "--resolution-sweep", "64", "--method-sweep", "esd-x", "--out", str(out), "--json", str(js)]
    assert speed.main(argv) == 0
    text = out.read_text()
    assert "<!-- esd_bench.benchmark:begin -->\nquality figures\n<!-- esd_bench.benchmark:end -->" in text
    section = text.split("<!-- esd_bench.speed:begin -->\n")[1].split("<!-- esd_bench.speed:end -->")[0]
    assert "`python -m esd_bench.speed --models tiny" in section
    assert "one torch thread" in section and "against the baseline (the issue's definition): time" in section

    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0] in {m.label for m in speed.MODES}:
            rows[cells[0]] = cells
    assert list(rows) == [m.label for m in speed.MODES]  # one row per mode, in order, none failed
    number = re.compile(r"^\d+(\.\d+)?(e[-+]\d+)?$")
    for label, cells in rows.items():
        assert number.match(cells[1]) and number.match(cells[3]), cells          # CPU and wall s/it
        assert re.match(r"^\d+ MiB$|^\d+\.\d\d GiB$", cells[4]), cells          # peak RSS
        if label in {speed.MODES_BY_KEY[k].label for k in speed.BASELINES}:
            assert cells[2] == "-"
        else:
            assert re.match(r"^\d+\.\d\d / \d+\.\d\d$", cells[2]), cells       # ratios to both baselines
    # The float32 modes erase exactly what the baseline erases; bf16 / fp16 round differently.
    weights = {label: float(cells[8]) for label, cells in rows.items() if cells[8] != "-"}
    for label in ("default (paper-faithful)", "gradient checkpointing", "baseline, as the 2023 code runs",
                  "default, oneDNN off"):
        assert weights[label] < 2e-3, (label, weights)
    assert weights["bf16 model"] > 10 * weights["default (paper-faithful)"]
    assert "With the number of DDIM steps for x_t" in section and re.search(r"^\| 4 \| 24,736 \| ", section, re.M)
    assert "With the resolution" in section and "| 64 px |" in section and "| esd-x | " in section

    # What the forward hooks counted per iteration: the same x_t work in every mode, batched or not.
    measured = {m["job"]["mode"]: m for m in json.loads(js.read_text())}
    assert set(measured) == {m.key for m in speed.MODES}  # every job ran once
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
