"""Fixtures for tests that drive a REAL ComfyUI 0.3.75 server (see comfy_server.py, checkpoints.py).

One server per test session: startup costs ~5-15 s and every model it loads stays cached in it.
Run: cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/host -x -q
"""
import subprocess
import sys
from pathlib import Path

import pytest

# tests/ has no __init__.py on purpose: the checkout root is the pack's package (it will have an
# __init__.py that imports ComfyUI), and pytest must not import it as a parent package of the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import ensure_checkpoint  # noqa: E402
from comfy_server import DEFAULT_COMFY, ROOT, ComfyServer  # noqa: E402

_TIMINGS = {}


@pytest.fixture(scope="session")
def timings():
    """Name -> seconds, printed in the terminal summary (so `-q` runs still show what is slow)."""
    return _TIMINGS


def pytest_terminal_summary(terminalreporter):
    if _TIMINGS:
        terminalreporter.section("ComfyUI host timings")
        for name, value in _TIMINGS.items():
            terminalreporter.write_line(f"{name:<40} {value}")


@pytest.fixture(scope="session")
def comfy_dir():
    """ComfyUI unpacked by tools/comfy_host.sh (installed on first use; a no-op when present)."""
    if not (DEFAULT_COMFY / "main.py").exists():
        subprocess.run([str(ROOT / "tools" / "comfy_host.sh"), "install"], check=True)
    return DEFAULT_COMFY


@pytest.fixture(scope="session")
def comfy_server(comfy_dir, tmp_path_factory, timings):
    server = ComfyServer(tmp_path_factory.mktemp("comfyhost"), comfy_dir=comfy_dir)
    server.start()
    timings["server start (s)"] = f"{server.startup_seconds:.1f}"
    try:
        yield server
    finally:
        server.stop()
        print(f"\nComfyUI log: {server.log_path}")


@pytest.fixture(scope="session")
def tiny_checkpoint(comfy_server, timings):
    """tiny_checkpoint("sd15" | "sd2v" | "sdxl") -> ckpt_name usable in CheckpointLoaderSimple.
    Files are built once and cached (checkpoints.py); the server sees them through symlinks."""
    import time

    def get(family):
        link = comfy_server.checkpoints_dir / f"tiny_{family}.safetensors"
        if not link.exists():
            t0 = time.monotonic()
            path = ensure_checkpoint(family, comfy_dir=comfy_server.comfy_dir)
            timings[f"checkpoint {family} ready (s)"] = f"{time.monotonic() - t0:.1f}"
            timings[f"checkpoint {family} size (MiB)"] = f"{path.stat().st_size / 2**20:.0f}"
            link.symlink_to(path)
        return link.name

    return get


@pytest.fixture(scope="session")
def toy_checkpoint(comfy_server, timings):
    """ckpt_name of the esd_bench toy model embedded in SD1.5 shapes (esd_bench/comfy_toy.py), built once per
    version of the committed toy weights and cached next to the tiny checkpoints."""
    import time

    from checkpoints import DEFAULT_CACHE

    from esd_bench import comfy_toy

    t0 = time.monotonic()
    cached = comfy_toy.cached_checkpoint(DEFAULT_CACHE)
    if time.monotonic() - t0 > 1:
        timings["toy checkpoint build (s)"] = f"{time.monotonic() - t0:.1f}"
    link = comfy_server.checkpoints_dir / "esd_toy_sd15.safetensors"
    if not link.exists():
        link.symlink_to(cached)
    return link.name
