"""The pack does nothing when ComfyUI imports it beyond registering its nodes: no network, no subprocess, no
eval/exec, no file written (an audit hook watches, tests/import_probe.py); and the Comfy Registry's rules (ruff S102,
S307) hold for its code."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY = Path(os.environ.get("COMFY_DIR", ROOT / ".comfyhost" / "ComfyUI"))
PROBE = ROOT / "tests" / "import_probe.py"
NODE_IDS = ["LoadFrozenUNet", "ESDTrain", "ApplyErasedWeights", "SaveErasedCheckpoint", "ExportErasureLoRA"]


def probe(pack: Path, tmp_path: Path) -> dict:
    if not (COMFY / "main.py").exists():
        subprocess.run([str(ROOT / "tools" / "comfy_host.sh"), "install"], check=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(PROBE), str(COMFY), str(pack)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_pack_only_registers_its_nodes(tmp_path):
    result = probe(ROOT, tmp_path)
    assert result["nodes"] == NODE_IDS
    assert result["events"] == []


BAD_PACK = '''
import os, socket, subprocess
open(os.path.join(os.path.dirname(__file__), "written.txt"), "w").close()
subprocess.run(["true"])
eval("1 + 1")
try:
    socket.create_connection(("127.0.0.1", 9), timeout=0.1)
except OSError:
    pass
NODE_CLASS_MAPPINGS = {"Bad": object}
'''


def test_the_probe_sees_what_a_misbehaving_pack_does(tmp_path):
    """The check can fail: a pack writing a file, starting a process, evaluating code and opening a socket at import
    is caught on each count."""
    pack = tmp_path / "bad_pack"
    pack.mkdir()
    (pack / "__init__.py").write_text(BAD_PACK)
    events = {e for e, _ in probe(pack, tmp_path)["events"]}
    assert "open" in events and "subprocess.Popen" in events and "exec" in events
    assert any(e.startswith("socket.") for e in events)


def test_registry_rules_hold_for_the_pack(tmp_path):
    """ruff with the pack's pyproject rules (S102 exec, S307 eval, pyflakes, pycodestyle) over the pack's code."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "__init__.py", "esd_core", "nodes"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = tmp_path / "uses_exec.py"  # the selected rules do catch exec and eval
    bad.write_text('exec("x = 1")\neval("1")\n')
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"),
                           str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert "S102" in proc.stdout and "S307" in proc.stdout
