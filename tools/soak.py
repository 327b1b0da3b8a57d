"""Soak the real ComfyUI host: 20 short trainings of the tiny SD1.5 checkpoint queued back to back, some cancelled
at random (some with resumable checkpoints), each checked (finished: a valid file; cancelled: none, or only its
checkpoint), with the host's resident memory and the bytes of all live tensors after each. ``--readme`` writes the
table into README.md.

    .venv/bin/python tools/soak.py [--runs 20] [--seed 0] [--readme]     (about 4 minutes on 2 CPU cores)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "host"))
sys.path.insert(0, str(ROOT))
import hostile  # noqa: E402
import soak  # noqa: E402
from comfy_server import DEFAULT_COMFY  # noqa: E402
from esd_bench.markdown import replace_section  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="which runs are cancelled, and when")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="esd_soak_") as work:
        server = hostile.start_server(Path(work), DEFAULT_COMFY)
        try:
            t0 = time.monotonic()
            runs = soak.soak(server, runs=args.runs, seed=args.seed)
            seconds = time.monotonic() - t0
            alive = server.alive()
        finally:
            server.stop()
    table = soak.markdown(runs) + f"\n\n*{args.runs} runs in {seconds:.0f} s; host alive at the end: {alive}.*"
    print(table)
    if args.readme:
        replace_section(ROOT / "README.md", "soak", table)
    return 0 if alive and all(r.valid for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
