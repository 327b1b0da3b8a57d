"""A soak run: short trainings queued back to back in the REAL ComfyUI host, some cancelled at random; after each, the
host's resident memory and the bytes of every tensor still alive in it (tests/host/esd_test_nodes). Used by
tests/host/test_hardening.py (a short run) and ``python tools/soak.py`` (the README's table).
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
from hostile import SD15, train  # noqa: E402

from esd_core.erased_weights import load_erased_weights  # noqa: E402
from esd_core.errors import ErasedWeightsError  # noqa: E402


@dataclass
class SoakRun:
    index: int
    cancel: bool            # asked to cancel
    checkpointing: bool     # checkpoint_every set
    outcome: str            # "finished" | "cancelled"
    seconds: float
    files: list[str]        # what the run left in loras/esd
    valid: bool             # a finished run's file loads and records every iteration; a cancelled run left no
    #                         erasure (at most its resumable checkpoint)
    rss_mib: float          # the host's resident memory after the run
    live_mib: float         # bytes of all tensors alive in the host after the run (nothing of the run cached)


def _rss(server) -> int:
    proc = psutil.Process(server.proc.pid)
    return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))


def _running(server, prompt_id) -> bool:
    _, queue = server._request("GET", "/queue")
    return prompt_id in [item[1] for item in queue.get("queue_running", [])]


def soak(server, runs: int = 20, iterations: int = 4, seed: int = 0, cancel_share: float = 0.35) -> list[SoakRun]:
    """Queue ``runs`` trainings (and a tensor probe after each) at once, cancel some while they train, check each."""
    rng = random.Random(seed)
    plan = []
    for i in range(runs):
        cancel = i > 0 and rng.random() < cancel_share  # the first one always finishes
        checkpointing = cancel and rng.random() < 0.5
        prompt = train(ckpt=SD15, filename_prefix=f"soak_{i:02d}", seed=1000 + i, iterations=iterations,
                       **({"checkpoint_every": 1} if checkpointing else {}))
        if cancel:
            prompt["2"]["inputs"]["iterations"] = 100000  # runs until cancelled
        plan.append((i, cancel, checkpointing, prompt))
    ids = []
    for i, cancel, checkpointing, prompt in plan:
        ids.append((server.queue(prompt), server.queue({"9": {"class_type": "ESDTestLiveTensors",
                                                              "inputs": {"label": f"after {i}"}}})))
    esd = server.loras_dir / "esd"
    out = []
    for (i, cancel, checkpointing, _), (run_id, probe_id) in zip(plan, ids):
        t0 = time.monotonic()
        if cancel:
            while not _running(server, run_id):
                time.sleep(0.1)
            time.sleep(rng.uniform(2.0, 6.0))  # somewhere in loading, sampling or training
            server.interrupt(run_id)
        entry = server.wait(run_id, timeout=900)
        seconds = time.monotonic() - t0
        outcome = "finished" if entry["status"]["status_str"] == "success" else "cancelled"
        probe = server.wait(probe_id, timeout=300)
        live = int(probe["outputs"]["9"]["text"][0])
        files = sorted(p.name for p in esd.glob(f"soak_{i:02d}*")) if esd.exists() else []
        if outcome == "finished":
            try:
                valid = files == [f"soak_{i:02d}_00001_.safetensors"] and \
                    load_erased_weights(esd / files[0]).header.iterations_run == iterations
            except ErasedWeightsError:
                valid = False
        else:
            valid = set(files) <= {f"soak_{i:02d}.esd-resume"} and (checkpointing or not files)
        valid = valid and not list(server.workdir.rglob("*.partial"))
        out.append(SoakRun(i, cancel, checkpointing, outcome, seconds, files, valid, _rss(server) / 2**20,
                           live / 2**20))
    return out


def markdown(runs: list[SoakRun]) -> str:
    rows = ["| run | asked | outcome | seconds | left in loras/esd | valid | host RSS (MiB) | live tensors (MiB) |",
            "|---:|---|---|---:|---|---|---:|---:|"]
    for r in runs:
        asked = ("cancel, checkpoint every 1" if r.checkpointing else "cancel") if r.cancel else "finish"
        rows.append(f"| {r.index} | {asked} | {r.outcome} | {r.seconds:.1f} | {', '.join(r.files) or '-'} | "
                    f"{'yes' if r.valid else 'NO'} | {r.rss_mib:.0f} | {r.live_mib:.1f} |")
    live = [r.live_mib for r in runs]
    rss = [r.rss_mib for r in runs]
    rows += ["", f"**{len(runs)} runs ({sum(r.outcome == 'finished' for r in runs)} finished, "
                 f"{sum(r.outcome == 'cancelled' for r in runs)} cancelled); all valid: "
                 f"{'yes' if all(r.valid for r in runs) else 'NO'}; live tensors after each run: {min(live):.1f} to "
                 f"{max(live):.1f} MiB; host RSS from run 2 to the last: {rss[min(2, len(rss) - 1)]:.0f} -> "
                 f"{rss[-1]:.0f} MiB.**"]
    return "\n".join(rows)
