"""The command line end to end (a real subprocess), and its errors (in-process, same code path)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from esd_core.cli import main
from esd_core.erased_weights import load_erased_weights

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--iterations", "4", "--ddim-steps", "4", "--lr", "1e-3"]


def run_cli(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "esd_core", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def unet_params(folder):
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    return pipe, dict(pipe.unet.named_parameters())


def test_erase_end_to_end(tmp_path, tiny_pipeline_dir):
    out = tmp_path / "van_gogh.safetensors"
    erased_dir = tmp_path / "erased_pipeline"
    proc = run_cli("erase", "--model", tiny_pipeline_dir, "--concept", "a painting by Van Gogh", "--concept",
                   "a starry night", "--method", "esd-x", *FAST, "--seed", "3", "--out", out,
                   "--save-pipeline", erased_dir)
    assert proc.returncode == 0, proc.stderr
    assert "4 iterations" in proc.stdout and out.exists()
    log = (tmp_path / "van_gogh.loss.csv").read_text().splitlines()
    assert log[0] == "step,loss" and len(log) == 5 and all(float(r.split(",")[1]) >= 0 for r in log[1:])
    erased = load_erased_weights(out)
    assert erased.header.concepts == ("a painting by Van Gogh", "a starry night")
    assert erased.header.hyperparameters["seed"] == 3 and erased.header.iterations_run == 4

    # the saved pipeline loads with diffusers and holds exactly base + diff
    _, base = unet_params(tiny_pipeline_dir)
    pipe, trained = unet_params(erased_dir)
    changed = {n for n in base if not torch.equal(base[n], trained[n])}
    assert changed and all(".attn2." in n for n in changed)
    assert len(changed) == len(erased.diffs)
    image = pipe("a painting by Van Gogh", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)

    info = run_cli("info", out)
    assert info.returncode == 0 and "a painting by Van Gogh" in info.stdout and "esd-x" in info.stdout

    # apply at strength 0 writes the base model back out
    base_again = tmp_path / "strength0"
    proc = run_cli("apply", "--model", tiny_pipeline_dir, "--weights", out, "--strength", "0",
                   "--save-pipeline", base_again)
    assert proc.returncode == 0, proc.stderr
    _, zero = unet_params(base_again)
    assert all(torch.equal(zero[n], base[n]) for n in base)


def test_apply_at_strength_one_matches_erase_save_pipeline(tmp_path, tiny_pipeline_dir, capsys):
    out, direct, applied = tmp_path / "e.safetensors", tmp_path / "direct", tmp_path / "applied"
    assert main(["erase", "--model", str(tiny_pipeline_dir), "--concept", "a cat", *FAST, "--out", str(out),
                 "--save-pipeline", str(direct)]) == 0
    assert main(["apply", "--model", str(tiny_pipeline_dir), "--weights", str(out), "--save-pipeline",
                 str(applied)]) == 0
    _, a = unet_params(direct)
    _, b = unet_params(applied)
    assert all(torch.equal(a[n], b[n]) for n in a)


def error_of(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


def test_hub_id_is_an_error_not_a_download(tmp_path, capsys):
    code, err = error_of(capsys, ["erase", "--model", "CompVis/stable-diffusion-v1-4", "--concept", "x",
                                  "--out", str(tmp_path / "o.safetensors")])
    assert code == 2 and "never downloads" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_incomplete_folder_names_what_is_missing(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text("{}")
    code, err = error_of(capsys, ["erase", "--model", str(tmp_path / "m"), "--concept", "x",
                                  "--out", str(tmp_path / "o.safetensors")])
    assert code == 2 and "missing unet, text_encoder, tokenizer, scheduler" in err


def test_existing_output_is_refused_before_training(tmp_path, tiny_pipeline_dir, capsys):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    code, err = error_of(capsys, ["erase", "--model", str(tiny_pipeline_dir), "--concept", "x", *FAST,
                                  "--out", str(out)])
    assert code == 2 and "already exists" in err and out.read_bytes() == b"keep me"


@pytest.mark.parametrize("extra,message", [(["--method", "esd-z"], "choose one of: esd-x"),
                                           (["--iterations", "0"], "iterations must be at least 1"),
                                           (["--concept", " "], None)])
def test_bad_settings(tmp_path, tiny_pipeline_dir, capsys, extra, message):
    argv = ["erase", "--model", str(tiny_pipeline_dir), "--out", str(tmp_path / "o.safetensors")]
    argv += extra if "--concept" in extra else ["--concept", "x", *extra]
    code, err = error_of(capsys, argv)
    assert code == 2 and (message or "no concept given") in err
    assert list(tmp_path.iterdir()) == []


def test_damaged_weights_file_is_refused(tmp_path, tiny_pipeline_dir, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    code, err = error_of(capsys, ["apply", "--model", str(tiny_pipeline_dir), "--weights", str(bad),
                                  "--save-pipeline", str(tmp_path / "p")])
    assert code == 2 and "damaged" in err and not (tmp_path / "p").exists()
    code, err = error_of(capsys, ["info", str(bad)])
    assert code == 2 and "damaged" in err
