"""Every key the pack writes for the real SD1.5 and SDXL architectures names exactly one module of ComfyUI's own LDM
UNet (the module names A1111's ldm/sgm and Forge use too), with the right shape: the diffusers-to-LDM conversion
(esd_core.keymap) and the file's stems checked against the host's real layouts, built on the meta device."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esd_bench.architectures import ldm_shapes
from esd_bench.file_sizes import erasure
from esd_core.erased_weights import resolve
from esd_core.keymap import stems_of

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_written_key_resolves_in_comfyuis_own_unet(comfy_dir, family):
    proc = subprocess.run([sys.executable, str(HERE / "ldm_layout.py"), "--comfy", str(comfy_dir), "--family", family],
                          capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    comfy = {n: torch.Size(s) for n, s in json.loads(proc.stdout).items()}
    assert ldm_shapes(family) == comfy  # every diffusers parameter converts to ComfyUI's own name and shape
    assert all(module is not None for module in stems_of(comfy).values())  # no two modules share a stem
    for method in ("esd-x", "esd-u"):
        for rank in (None, 16):
            erased = erasure(family, method, torch.float16, rank)
            resolved = resolve(erased, comfy, family)
            assert len(resolved) == len(erased.modules) and len(set(resolved.values())) == len(resolved)
