"""ESD for AUTOMATIC1111 and Forge: the extension's glue over `esd_core` (the hosts load `scripts/esd_erase.py`).

`request`, `jobs` and `tab` are host-independent; `a1111` and `forge` are each host's model and queue glue; `training`
runs one erasure in whichever host is running; `api` is the ``/esd/v1`` HTTP API. Nothing here runs at import time.
"""
import os
import sys

EXTENSION_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _importable() -> None:
    """Put the extension's folder (which holds `esd_core`) on sys.path for good: the hosts add it only while they
    load the script, then restore their saved list, and the callbacks import the core later."""
    if EXTENSION_DIR not in sys.path:
        sys.path.append(EXTENSION_DIR)


def on_app_started(_demo, app) -> None:
    """``script_callbacks.on_app_started``: add the ``/esd/v1`` routes to the host's FastAPI app."""
    _importable()
    from .api import add_routes
    from .training import JOBS, host_glue

    add_routes(app, JOBS, host_glue().check_model)


def on_ui_tabs():
    """``script_callbacks.on_ui_tabs``: the ESD tab."""
    _importable()
    from .tab import build_tab
    from .training import JOBS, host_glue

    return [(build_tab(JOBS, host_glue().check_model), "ESD", "esd")]
