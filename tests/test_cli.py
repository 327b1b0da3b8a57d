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
from esd_core.testing import save_tiny_sdxl_pipeline

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
    assert log[0] == "step,loss" and len(log) == 5
    assert f"final loss {float(log[-1].split(',')[1]):.4g}" in proc.stdout  # the log holds the run's losses
    erased = load_erased_weights(out)
    assert erased.header.concepts == ("a painting by Van Gogh", "a starry night")
    assert erased.header.hyperparameters["seed"] == 3 and erased.header.iterations_run == 4
    assert erased.header.save_dtype == "fp16" and erased.modules  # the default: half-size files

    # the saved pipeline loads with diffusers and holds exactly base + diff
    _, base = unet_params(tiny_pipeline_dir)
    pipe, trained = unet_params(erased_dir)
    changed = {n for n in base if not torch.equal(base[n], trained[n])}
    assert changed and all(".attn2." in n for n in changed)
    assert len(changed) == sum((c.weight is not None) + (c.bias is not None) for c in erased.modules.values())
    image = pipe("a painting by Van Gogh", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)

    info = run_cli("info", out)
    assert info.returncode == 0 and "a painting by Van Gogh" in info.stdout and "esd-x" in info.stdout
    assert "fp16" in info.stdout and "full" in info.stdout

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
                 "--save-dtype", "fp32", "--save-pipeline", str(direct)]) == 0
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


def test_fast_lora_and_optimizer_flags_reach_the_trainer(tmp_path, tiny_pipeline_dir, capsys):
    """--fast picks the method's fast x_t strategy, --lora-rank trains a LoRA (a LoRA file), --optimizer is used."""
    out = tmp_path / "fast_lora.safetensors"
    assert main(["erase", "--model", str(tiny_pipeline_dir), "--concept", "a cat", "--method", "esd-x", *FAST,
                 "--fast", "--lora-rank", "2", "--optimizer", "adafactor", "--out", str(out)]) == 0
    assert "weights trained" in capsys.readouterr().out
    erased = load_erased_weights(out)
    hp = erased.header.hyperparameters
    assert (hp["sample_with"], hp["trajectory_pool"]) == ("frozen", 1)  # esd-x's fast mode
    assert hp["optimizer"] == "adafactor" and hp["lora_rank"] == 2
    assert erased.kind == "lora" and erased.header.rank == 2
    assert all(".attn2" in stem or "attn2" in stem for stem in erased.modules)
    u_out = tmp_path / "fast_u.safetensors"
    assert main(["erase", "--model", str(tiny_pipeline_dir), "--concept", "a cat", "--method", "esd-u",
                 "--iterations", "2", "--ddim-steps", "20", "--fast", "--out", str(u_out)]) == 0
    hp = load_erased_weights(u_out).header.hyperparameters
    assert (hp["sample_with"], hp["trajectory_pool"], hp["ddim_steps"]) == ("trained", 0, 10)  # global: DDIM 10


@pytest.fixture(scope="module")
def full_file(tmp_path_factory, tiny_pipeline_dir):
    out = tmp_path_factory.mktemp("full") / "u.safetensors"
    assert main(["erase", "--model", str(tiny_pipeline_dir), "--concept", "a cat", "--method", "esd-u", *FAST,
                 "--save-dtype", "fp32", "--out", str(out)]) == 0
    return out


def test_export_lora_then_info_and_apply(tmp_path, tiny_pipeline_dir, full_file, capsys):
    lora = tmp_path / "lora4.safetensors"
    assert main(["export-lora", "--weights", str(full_file), "--rank", "4", "--out", str(lora)]) == 0
    assert "LoRA rank 4" in capsys.readouterr().out
    exported = load_erased_weights(lora)
    assert exported.kind == "lora" and exported.header.rank == 4 and exported.header.save_dtype == "fp16"
    assert exported.header.export["source"] == "u.safetensors" and 0 < exported.header.kept_energy < 1
    assert main(["info", str(lora)]) == 0
    info = capsys.readouterr().out
    assert "lora rank" in info and "kept energy" in info and "dropped" in info
    by_energy = tmp_path / "e90.safetensors"
    assert main(["export-lora", "--weights", str(full_file), "--energy", "0.9", "--out", str(by_energy)]) == 0
    assert load_erased_weights(by_energy).header.export == {"energy": 0.9, "source": "u.safetensors",
                                                             "source_kind": "full"}
    applied = tmp_path / "applied"
    assert main(["apply", "--model", str(tiny_pipeline_dir), "--weights", str(lora), "--save-pipeline",
                 str(applied)]) == 0
    _, base = unet_params(tiny_pipeline_dir)
    _, after = unet_params(applied)
    changed = {n for n in base if not torch.equal(base[n], after[n])}
    assert changed and not any(".attn2." in n for n in changed)  # esd-u layers, through the LoRA


@pytest.mark.parametrize("extra,message", [(["--rank", "1000"], "rank 1000 is larger than"),
                                           (["--energy", "0"], "energy must be in (0, 1]"),
                                           (["--energy", "1.01"], "energy must be in (0, 1]")])
def test_export_lora_refuses_bad_requests_and_writes_nothing(tmp_path, full_file, capsys, extra, message):
    out = tmp_path / "o.safetensors"
    code, err = error_of(capsys, ["export-lora", "--weights", str(full_file), *extra, "--out", str(out)])
    assert code == 2 and message in err and list(tmp_path.iterdir()) == []


def test_export_lora_refuses_other_files_and_existing_outputs(tmp_path, full_file, capsys):
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(other))
    code, err = error_of(capsys, ["export-lora", "--weights", str(other), "--rank", "2", "--out",
                                  str(tmp_path / "o.safetensors")])
    assert code == 2 and "not an ESD erased-weights file" in err and not (tmp_path / "o.safetensors").exists()
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep")
    code, err = error_of(capsys, ["export-lora", "--weights", str(full_file), "--rank", "2", "--out", str(existing)])
    assert code == 2 and "already exists" in err and existing.read_bytes() == b"keep"


def test_sdxl_folders_erase_export_and_apply(tmp_path, capsys):
    """An SDXL diffusers folder (two text encoders, pooled embeddings, size conditioning) end to end headless."""
    from diffusers import StableDiffusionXLPipeline

    model = save_tiny_sdxl_pipeline(tmp_path / "tiny_sdxl")
    out, erased_dir = tmp_path / "xl.safetensors", tmp_path / "xl_erased"
    assert main(["erase", "--model", str(model), "--concept", "a cat", *FAST, "--resolution", "64",
                 "--save-dtype", "fp32", "--out", str(out), "--save-pipeline", str(erased_dir)]) == 0
    erased = load_erased_weights(out)
    assert erased.header.model_family == "sdxl"
    assert "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k" in erased.modules  # 2 blocks in one level
    lora = tmp_path / "xl_lora.safetensors"
    assert main(["export-lora", "--weights", str(out), "--energy", "1", "--out", str(lora), "--save-dtype",
                 "fp32"]) == 0
    applied = tmp_path / "xl_applied"
    assert main(["apply", "--model", str(model), "--weights", str(lora), "--save-pipeline", str(applied)]) == 0

    def unet(folder):
        return dict(StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True).unet
                    .named_parameters())

    base, direct, via_lora = unet(model), unet(erased_dir), unet(applied)
    for n, p in direct.items():  # the full-energy LoRA gives the trained weights up to SVD round-off...
        if n.endswith(".weight"):
            torch.testing.assert_close(via_lora[n], p, rtol=0, atol=1e-5)
        else:  # ...and leaves the biases of low-rank layers (dropped: A1111 could not apply them) as they were
            assert torch.equal(via_lora[n], base[n]) and (".attn2.to_out" in n or torch.equal(p, base[n]))


def test_sdxl_adapter_conditioning(tmp_path):
    from esd_core.diffusers_adapter import DiffusersSDAdapter, DiffusersSDXLAdapter, adapter_from_folder
    from esd_core.errors import ModelLoadError

    folder = save_tiny_sdxl_pipeline(tmp_path / "xl")
    adapter = adapter_from_folder(folder, resolution=48)
    assert isinstance(adapter, DiffusersSDXLAdapter) and adapter.family.value == "sdxl"
    cond = adapter.encode_prompts(["", "a cat"])
    context, _, pooled, _ = adapter.pipeline.encode_prompt(["a cat"], device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.context[1:], context)  # diffusers' own SDXL prompt encoding (batched: rounding)
    torch.testing.assert_close(cond.extras["text_embeds"][1:], pooled)
    assert not cond.context[0].any() and not cond.extras["text_embeds"][0].any()  # force_zeros_for_empty_prompt
    assert cond.extras["time_ids"].tolist() == [[48, 48, 0, 0, 48, 48]] * 2
    eps = adapter.predict_noise(torch.randn(2, 4, 6, 6), torch.tensor([10, 900]), cond)
    assert eps.shape == (2, 4, 6, 6) and torch.isfinite(eps).all()
    with pytest.raises(ModelLoadError, match="SDXL pipeline: use DiffusersSDXLAdapter"):
        DiffusersSDAdapter(adapter.pipeline, adapter.base)


@pytest.mark.parametrize("pipeline_dtype, saved", [("auto", torch.float16), ("fp32", torch.float32)])
def test_saved_pipeline_keeps_the_base_dtype_and_every_trained_update(tmp_path, tiny_pipeline_dir, pipeline_dtype,
                                                                       saved):
    """Trained in bf16, saved from an fp16 base: the saved UNet is fp16 (the base's own; or the dtype named) and holds
    base + diff rounded once to it, not bf16 weights."""
    base_dir = tmp_path / "fp16_base"
    StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir), local_files_only=True, safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False
                                            ).to(torch.float16).save_pretrained(base_dir)
    out, erased_dir = tmp_path / "e.safetensors", tmp_path / "erased"
    assert main(["erase", "--model", str(base_dir), "--concept", "a cat", *FAST, "--dtype", "bf16",
                 "--save-dtype", "fp32", "--out", str(out), "--save-pipeline", str(erased_dir),
                 "--save-pipeline-dtype", pipeline_dtype]) == 0
    from safetensors.torch import load_file

    from esd_core.erased_weights import dense_diffs, resolve
    from esd_core.keymap import diffusers_to_ldm_names

    base = load_file(str(base_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    written = load_file(str(erased_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in written.values()} == {saved}
    to_ldm = diffusers_to_ldm_names(list(base))
    erased = load_erased_weights(out)
    diffs = dense_diffs(erased, resolve(erased, {to_ldm[n]: t.shape for n, t in base.items()}, "sd1"))
    changed = [n for n in base if to_ldm.get(n) in diffs]
    assert changed
    for n in changed:
        expected = (base[n].float() + diffs[to_ldm[n]]).to(saved)
        assert torch.equal(written[n], expected), n
    untouched = [n for n in base if n not in changed]
    assert all(torch.equal(written[n], base[n].to(saved)) for n in untouched)
