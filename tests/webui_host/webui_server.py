"""Run the REAL AUTOMATIC1111 v1.10.1 or Forge web UI headless (API only) with this checkout as an extension, and talk
to it over its HTTP API.

    host = find_host("a1111")                  # from A1111_ROOT / FORGE_ROOT; host.missing says why it cannot run
    with WebUIServer(host, workdir) as srv:    # own copy of the web UI tree, the pack in extensions/
        image = srv.txt2img("a cat <lora:x:1>", seed=1)
        srv.refresh_loras(); srv.log_since(mark)

The server is started by the host kit's `run_webui.sh` (CPU, offline, `--api --nowebui`, loopback) in a working copy
of the web UI under `workdir`: the host writes its config, caches and models folders into its own tree, so every test
session gets its own copy and the kit (or a user's checkout) is never written to. Only the stdlib and Pillow are used.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "esd_concept_erasure"
HOSTS = ("a1111", "forge")
ROOT_VARS = {"a1111": "A1111_ROOT", "forge": "FORGE_ROOT"}
TITLES = {"a1111": "AUTOMATIC1111", "forge": "Forge"}

# What a web UI's launcher clones into webui/repositories/ on first start and it cannot start without:
# repository -> the package inside it. tools/webui_host.sh installs the ones PyPI has at the pinned commit instead.
REQUIRED_REPOSITORIES = {
    "a1111": {"stable-diffusion-stability-ai": "ldm", "generative-models": "sgm", "k-diffusion": "k_diffusion"},
    "forge": {"huggingface_guess": "huggingface_guess"},
}


@dataclass(frozen=True)
class WebUIHost:
    """A web UI found through its environment variable; ``missing`` says why it cannot run ("" when it can)."""

    name: str           # "a1111" | "forge"
    webui: Path | None  # the web UI tree (with launch.py)
    runner: Path | None  # the kit's run_webui.sh
    venv: Path          # made by tools/webui_host.sh
    missing: str = ""

    @property
    def title(self) -> str:
        return TITLES[self.name]


def find_host(name: str) -> WebUIHost:
    """Resolve ``A1111_ROOT`` / ``FORGE_ROOT``: a host folder of the kit (with ``webui/``) or a web UI checkout."""
    var = ROOT_VARS[name]
    venv = ROOT / ".webuihost" / name / "venv"
    raw = os.environ.get(var, "")
    if not raw:
        return WebUIHost(name, None, None, venv, f"{var} is not set (point it at the host kit's {name}/ folder "
                                                 "or at a web UI checkout)")
    root = Path(raw).resolve()
    webui = root / "webui" if (root / "webui" / "launch.py").exists() else root
    if not (webui / "launch.py").exists():
        return WebUIHost(name, None, None, venv, f"{var}={raw} has neither launch.py nor webui/launch.py")
    runner = next((d / "run_webui.sh" for d in (root.parent, root.parent.parent, ROOT.parent / "shared" / "hosts")
                   if (d / "run_webui.sh").exists()), None)
    if runner is None:
        return WebUIHost(name, webui, None, venv, f"no run_webui.sh (the host kit's launcher) beside {root}")
    absent = [repo for repo, package in REQUIRED_REPOSITORIES[name].items()
              if not (webui / "repositories" / repo / package).is_dir()
              and not any(venv.glob(f"lib/python3*/site-packages/{package}/__init__.py"))]
    if absent:
        return WebUIHost(name, webui, runner, venv,
                         f"{webui}/repositories lacks {', '.join(absent)} (the repositories a web UI's launcher clones "
                         "on first start; the tests start it offline)")
    if not (venv / ".esd-stamp").exists():
        return WebUIHost(name, webui, runner, venv, f"no host venv at {venv}: run {var}={raw} tools/webui_host.sh install")
    return WebUIHost(name, webui, runner, venv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode_image(b64: str) -> np.ndarray:
    """An API image (base64 PNG) as an (H, W, 3) uint8 array."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


class HTTPFailure(RuntimeError):
    def __init__(self, method, path, status, body):
        self.status, self.body = status, body
        super().__init__(f"{method} {path} -> {status}: {str(body)[:2000]}")


class WebUIServer:
    """One headless host process with its own working copy, extensions/ and models/ folders."""

    def __init__(self, host: WebUIHost, workdir: Path, port: int | None = None, startup_timeout: float = 300.0):
        if host.missing:
            raise RuntimeError(f"{host.title} cannot run: {host.missing}")
        self.host = host
        self.workdir = Path(workdir).resolve() / "webui"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.checkpoints_dir = self.workdir / "models" / "Stable-diffusion"
        self.loras_dir = self.workdir / "models" / "Lora"
        self.extensions_dir = self.workdir / "extensions"
        self.log_path = Path(workdir).resolve() / f"{host.name}.log"
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def prepare(self) -> "WebUIServer":
        """The working copy (writable: the kit may be read-only), with the pack linked into extensions/ as a user's
        clone would be, and empty model folders. Call before placing checkpoints; `start` calls it if needed."""
        if not self.workdir.exists():
            shutil.copytree(self.host.webui, self.workdir, symlinks=True, ignore=shutil.ignore_patterns("venv", ".git"))
            for path in [self.workdir, *self.workdir.rglob("*")]:
                if not path.is_symlink():
                    path.chmod(path.stat().st_mode | stat.S_IWUSR)
        for d in (self.checkpoints_dir, self.loras_dir, self.extensions_dir):
            d.mkdir(parents=True, exist_ok=True)
        # No live previews: A1111 would fetch its preview decoder (models/VAE-approx) from the network for them.
        config = self.workdir / "config.json"
        if not config.exists():
            config.write_text(json.dumps({"live_previews_enable": False}))
        link = self.extensions_dir / PACK_NAME
        if not link.is_symlink():
            link.symlink_to(ROOT, target_is_directory=True)
        return self

    # ------------------------------------------------------------------ lifecycle
    def start(self, *launch_args: str) -> "WebUIServer":
        self.prepare()
        cmd = [str(self.host.runner), self.host.name, str(self.host.venv), str(self.workdir), str(self.port),
               *launch_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self._log = open(self.log_path, "ab")
        t0 = time.monotonic()
        # own session and process group: stop() signals exactly this server (run_webui.sh execs its python)
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"{self.host.title} exited with {code} during startup:\n{self.log_tail()}")
            try:
                self.get("/sdapi/v1/sd-models", timeout=5)
                break
            except (OSError, HTTPFailure):
                pass
            if time.monotonic() - t0 > self.startup_timeout:
                self.stop()
                raise TimeoutError(f"{self.host.title} API not up after {self.startup_timeout} s:\n{self.log_tail()}")
            time.sleep(0.5)
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self, grace: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "WebUIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ log
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_size(self) -> int:
        """A mark for `log_since`: what the host writes after it belongs to what was done after it."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, mark: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace")

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ------------------------------------------------------------------ HTTP
    def request(self, method: str, path: str, body=None, timeout: float = 60.0):
        """(status, parsed JSON or text) as the server answered, errors included."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def _ok(self, method, path, body=None, timeout=60.0):
        status, answer = self.request(method, path, body, timeout)
        if status != 200:
            raise HTTPFailure(method, path, status, answer)
        return answer

    def get(self, path: str, timeout: float = 60.0):
        return self._ok("GET", path, timeout=timeout)

    def post(self, path: str, body=None, timeout: float = 60.0):
        return self._ok("POST", path, body if body is not None else {}, timeout)

    def txt2img(self, prompt: str, seed: int = 1, steps: int = 3, size: int = 64, cfg: float = 5.0,
                negative: str = "", timeout: float = 600.0) -> tuple[np.ndarray, dict]:
        """`/sdapi/v1/txt2img` with a deterministic sampler; returns (image, info) where info is the parsed infotext
        JSON (its ``extra_generation_params`` carry the host's notes, e.g. "Networks with errors")."""
        answer = self.post("/sdapi/v1/txt2img", {
            "prompt": prompt, "negative_prompt": negative, "seed": seed, "steps": steps, "width": size,
            "height": size, "cfg_scale": cfg, "sampler_name": "Euler", "batch_size": 1, "n_iter": 1,
            "send_images": True, "save_images": False}, timeout=timeout)
        return decode_image(answer["images"][0]), json.loads(answer["info"])

    def refresh_loras(self) -> None:
        self.post("/sdapi/v1/refresh-loras")

    def loras(self) -> list[dict]:
        return self.get("/sdapi/v1/loras")
