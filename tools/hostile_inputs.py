"""Send every bad and hostile input of tests/host/hostile.py through a real ComfyUI host (started here, CPU, in a
temporary folder) and print the table of what the user sees; ``--readme`` writes it into README.md.

    .venv/bin/python tools/hostile_inputs.py [--readme]      (about a minute on 2 CPU cores)
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
from comfy_server import DEFAULT_COMFY  # noqa: E402
from esd_bench.markdown import replace_section  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="esd_hostile_") as work:
        server = hostile.start_server(Path(work), DEFAULT_COMFY)
        try:
            t0 = time.monotonic()
            results = hostile.run_all(server)
            seconds = time.monotonic() - t0
        finally:
            server.stop()
    table = hostile.markdown(results)
    print(table)
    print(f"\n{seconds:.0f} s", file=sys.stderr)
    if args.readme:
        replace_section(ROOT / "README.md", "hostile_inputs", table)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
