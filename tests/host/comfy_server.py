"""Start the REAL ComfyUI server (unpacked by tools/comfy_host.sh) with this checkout as a custom-node pack,
and talk to it over its HTTP + websocket API, exactly as the browser frontend does.

    with ComfyServer(workdir=tmp) as srv:
        pid = srv.queue(api_prompt)           # POST /prompt
        entry = srv.wait(pid, timeout=120)    # the /history entry: status, outputs
        srv.interrupt(); srv.alive()

Everything the server writes (output, input, temp, user dirs, log) lives under `workdir`, so test runs never
touch the shared .comfyhost/ComfyUI tree. Only stdlib `urllib` and `websocket-client` are used.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import websocket  # websocket-client

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_COMFY = Path(os.environ.get("COMFY_DIR", ROOT / ".comfyhost" / "ComfyUI"))
PACK_NAME = "esd_concept_erasure"


def txt2img_prompt(ckpt_name, prefix, steps=4, seed=0, width=64, height=64, cfg=7.0, sampler="euler",
                   positive="a photo of a cat", negative="blurry"):
    """The stock txt2img graph in API format: CheckpointLoaderSimple -> CLIPTextEncode x2 ->
    EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage. Node ids are strings, links are [id, output]."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


class PromptRejected(Exception):
    """POST /prompt answered 400 (validation failed). `.response` is the server's JSON
    ({"error": {...}, "node_errors": {node_id: {"errors": [...], ...}}})."""

    def __init__(self, response):
        self.response = response
        super().__init__("prompt rejected: " + json.dumps(response, indent=1)[:4000])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, workdir, comfy_dir=DEFAULT_COMFY, pack_dir=ROOT, port=None, python=sys.executable,
                 extra_args=(), startup_timeout=180.0):
        self.workdir = Path(workdir).resolve()
        self.comfy_dir = Path(comfy_dir).resolve()
        self.pack_dir = Path(pack_dir).resolve()
        self.port = port or free_port()
        self.python = python
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.custom_nodes_dir = self.workdir / "custom_nodes"
        self.checkpoints_dir = self.workdir / "models" / "checkpoints"
        self.loras_dir = self.workdir / "models" / "loras"
        self.output_dir = self.workdir / "output"
        self.input_dir = self.workdir / "input"
        self.temp_dir = self.workdir / "temp"
        self.user_dir = self.workdir / "user"
        self.log_path = self.workdir / "comfyui.log"
        self.proc = None
        self.startup_seconds = None

    # ------------------------------------------------------------------ lifecycle
    def start(self):
        if not (self.comfy_dir / "main.py").exists():
            raise FileNotFoundError(f"{self.comfy_dir}/main.py missing: run tools/comfy_host.sh install")
        for d in (self.custom_nodes_dir, self.checkpoints_dir, self.loras_dir, self.output_dir,
                  self.input_dir, self.temp_dir, self.user_dir):
            d.mkdir(parents=True, exist_ok=True)
        # The pack is a symlink named like the pack, so ComfyUI loads the live checkout exactly like a user's
        # git clone in custom_nodes/ (same folder name in /object_info, /extensions and template routes).
        link = self.custom_nodes_dir / PACK_NAME
        if not link.is_symlink():
            link.symlink_to(self.pack_dir, target_is_directory=True)
        # utils/extra_config.py adds every key of every top-level section to folder_paths; a yaml is the
        # only way to add a custom_nodes folder outside the ComfyUI tree (there is no CLI flag for it).
        yaml_path = self.workdir / "extra_model_paths.yaml"
        # is_default puts these folders FIRST in folder_paths (add_model_folder_path inserts at 0), so code that
        # saves to get_folder_paths("loras")[0] writes under workdir, never into the shared ComfyUI tree.
        # (paths are written as JSON strings, which YAML reads verbatim even with spaces or colons)
        dirs = {"custom_nodes": self.custom_nodes_dir, "checkpoints": self.checkpoints_dir, "loras": self.loras_dir}
        yaml_path.write_text("esd_test:\n    is_default: true\n"
                             + "".join(f"    {k}: {json.dumps(str(v))}\n" for k, v in dirs.items()))
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--extra-model-paths-config", str(yaml_path),
               "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
               "--temp-directory", str(self.temp_dir), "--user-directory", str(self.user_dir),
               # the default sqlite file lives inside the ComfyUI tree (ComfyUI/user/comfyui.db)
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        # One torch thread: on the 2 shared cores, more threads make every op many times slower.
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "ab")
        t0 = time.monotonic()
        # own session: a Ctrl-C in the terminal reaches pytest, which then stops the server cleanly
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()  # closes the log file
                raise RuntimeError(f"ComfyUI exited with {code} during startup:\n{self.log_tail()}")
            try:
                self._get("/object_info", timeout=10)  # answers only once all nodes are loaded
                break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() - t0 > self.startup_timeout:
                self.stop()
                raise TimeoutError(f"ComfyUI not ready after {self.startup_timeout}s:\n{self.log_tail()}")
            time.sleep(0.5)
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self, grace=15.0):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: aiohttp shuts down; the worker thread is a daemon
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_text(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines=60):
        return "\n".join(self.log_text().splitlines()[-lines:])

    def pack_import_failed(self):
        """True/False once ComfyUI printed its "Import times for custom nodes" table, None before."""
        lines = [x for x in self.log_text().splitlines() if x.rstrip().endswith("/" + PACK_NAME)]
        return None if not lines else any("IMPORT FAILED" in x for x in lines)

    # ------------------------------------------------------------------ HTTP
    def _request(self, method, path, body=None, timeout=30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:  # 4xx/5xx still carry a JSON body worth showing
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, {"raw": raw.decode(errors="replace")}

    def _get(self, path, timeout=30):
        status, body = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}: {body}")
        return body

    def object_info(self, node_class=None):
        info = self._get("/object_info" + (f"/{node_class}" if node_class else ""), timeout=60)
        return info[node_class] if node_class else info

    def submit(self, prompt, client_id=None, extra_data=None):
        """POST /prompt; returns (http_status, json) as they are, errors included."""
        body = {"prompt": prompt}
        if client_id:
            body["client_id"] = client_id  # routes progress/executing websocket messages to that client
        if extra_data:
            body["extra_data"] = extra_data
        return self._request("POST", "/prompt", body)

    def queue(self, prompt, client_id=None, extra_data=None):
        """POST /prompt and return the prompt_id; a rejected prompt raises PromptRejected with the JSON."""
        status, resp = self.submit(prompt, client_id, extra_data)
        if status == 200:
            return resp["prompt_id"]
        if status == 400:
            raise PromptRejected(resp)
        raise RuntimeError(f"POST /prompt -> {status}: {resp}\n{self.log_tail()}")

    def history(self, prompt_id):
        return self._get(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id, timeout=300.0, poll=0.2):
        """Block until the prompt left the queue; returns its /history entry:
        {"status": {"status_str": "success"|"error", "completed": bool, "messages": [[type, data], ...]},
         "outputs": {node_id: ui dict}, "prompt": [...], "meta": {...}}."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry is not None and entry.get("status") is not None:
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout}s:\n{self.log_tail()}")

    def run(self, prompt, timeout=300.0, client_id=None):
        return self.wait(self.queue(prompt, client_id=client_id), timeout=timeout)

    def interrupt(self, prompt_id=None):
        """POST /interrupt: sets ComfyUI's global interrupt flag (only for prompt_id if given and running)."""
        status, _ = self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        return status == 200

    def alive(self):
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            return self._request("GET", "/queue", timeout=10)[0] == 200
        except OSError:
            return False

    def listen(self, client_id=None):
        return WsListener(self.port, client_id or uuid.uuid4().hex)


class WsListener:
    """Collects the JSON websocket messages ComfyUI sends to one client_id (progress, executing,
    execution_start/cached/success/error/interrupted, executed, status, ...), with the monotonic time each
    arrived (`received`), and the binary frames (previews, progress text) as bytes (`binary`). Pass
    `listener.client_id` to ComfyServer.queue()."""

    def __init__(self, port, client_id):
        self.client_id = client_id
        self.messages = []
        self.received = []  # time.monotonic() of each message in `messages`
        self.binary = []
        self._cond = threading.Condition()
        self._ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws?clientId={client_id}", timeout=30)
        self._ws.settimeout(None)
        self._thread = threading.Thread(target=self._run, name=f"ws-{client_id[:8]}", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            while True:
                opcode, data = self._ws.recv_data()
                with self._cond:
                    if opcode == websocket.ABNF.OPCODE_TEXT:
                        self.messages.append(json.loads(data))
                        self.received.append(time.monotonic())
                    elif opcode == websocket.ABNF.OPCODE_BINARY:
                        self.binary.append(data)
                    elif opcode == websocket.ABNF.OPCODE_CLOSE:
                        return
                    self._cond.notify_all()
        except (websocket.WebSocketException, OSError):
            return  # closed by close() or by the server going away

    @property
    def binary_frames(self):
        return len(self.binary)

    def of_type(self, *types, prompt_id=None):
        with self._cond:
            return [m for m in self.messages if m.get("type") in types
                    and (prompt_id is None or (m.get("data") or {}).get("prompt_id") == prompt_id)]

    def wait_for(self, msg_type, prompt_id=None, timeout=120.0):
        """Return the first message of `msg_type` (for `prompt_id` if given), waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if m.get("type") == msg_type
                         and (prompt_id is None or (m.get("data") or {}).get("prompt_id") == prompt_id)]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    raise TimeoutError(f"no {msg_type!r} message after {timeout}s; got "
                                       f"{[m.get('type') for m in self.messages][-20:]}")
                self._cond.wait(min(left, 1.0))

    def close(self):
        try:
            self._ws.close()
        except (websocket.WebSocketException, OSError):
            pass
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
