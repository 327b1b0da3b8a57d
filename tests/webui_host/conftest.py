"""Fixtures for tests inside the REAL AUTOMATIC1111 v1.10.1 and Forge web UIs (webui_server.py).

Every test that uses the ``webui`` fixture runs once per host. A host is found through ``A1111_ROOT`` / ``FORGE_ROOT``
(the host kit's folder or a web UI checkout) and needs its venv from tools/webui_host.sh. A host that is not there is
not run: its tests are deselected (never skipped, never counted as passed) and the terminal summary says so and why.
One server per host per session: it starts in 10-30 s and keeps its loaded model.

    A1111_ROOT=../shared/hosts/a1111 FORGE_ROOT=../shared/hosts/forge tools/webui_host.sh install
    A1111_ROOT=... FORGE_ROOT=... OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/webui_host -q
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from webui_checkpoint import place_checkpoint  # noqa: E402
from webui_server import HOSTS, ROOT, WebUIServer, find_host  # noqa: E402

_HOSTS = {name: find_host(name) for name in HOSTS}
_NOT_RUN: dict[str, int] = {}
_TIMINGS: dict[str, str] = {}


def pytest_generate_tests(metafunc):
    if "webui_host" in metafunc.fixturenames:
        metafunc.parametrize("webui_host", HOSTS, scope="session")


def _host_of(item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("webui_host") if callspec else None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Deselect the tests of hosts that are not there; run the rest host by host (one server start each)."""
    keep, dropped = [], []
    for item in items:
        host = _host_of(item)
        if host and _HOSTS[host].missing:
            dropped.append(item)
            _NOT_RUN[host] = _NOT_RUN.get(host, 0) + 1
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    order = {host: i for i, host in enumerate(HOSTS)}
    items[:] = sorted(keep, key=lambda item: order.get(_host_of(item), -1))  # stable: tests keep their order


def pytest_terminal_summary(terminalreporter):
    if _NOT_RUN:
        terminalreporter.section("A1111 / Forge host tests NOT RUN", red=True)
        for host, count in _NOT_RUN.items():
            terminalreporter.write_line(f"{_HOSTS[host].title}: {count} tests did not run: {_HOSTS[host].missing}")
    if _TIMINGS:
        terminalreporter.section("A1111 / Forge host timings")
        for name, value in _TIMINGS.items():
            terminalreporter.write_line(f"{name:<44} {value}")


@pytest.fixture(scope="session")
def webui_timings():
    """Name -> value, printed in the terminal summary."""
    return _TIMINGS


@pytest.fixture(scope="session")
def comfy_installed():
    """The test checkpoint is built with ComfyUI's classes (tests/host/checkpoints.py)."""
    if not (ROOT / ".comfyhost" / "ComfyUI" / "main.py").exists():
        subprocess.run([str(ROOT / "tools" / "comfy_host.sh"), "install"], check=True)


@pytest.fixture(scope="session")
def webui(webui_host, comfy_installed, tmp_path_factory):
    """A started host with the pack in extensions/ and the test checkpoint loaded (one per host per session)."""
    server = WebUIServer(_HOSTS[webui_host], tmp_path_factory.mktemp(webui_host)).prepare()
    t0 = time.monotonic()
    place_checkpoint(server.checkpoints_dir, server.workdir, with_sidecar=webui_host == "a1111")
    _TIMINGS["test checkpoint ready (s)"] = _TIMINGS.get("test checkpoint ready (s)", f"{time.monotonic() - t0:.1f}")
    server.start()
    _TIMINGS[f"{webui_host}: API up after (s)"] = f"{server.startup_seconds:.1f}"
    try:
        yield server
    finally:
        server.stop()
        print(f"\n{server.host.title} log: {server.log_path}")
