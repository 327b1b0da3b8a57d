"""AUTOMATIC1111 / Forge entry point of the ESD extension: the ESD tab and the /esd/v1 API (glue in webui_ext/)."""
import os
import sys

# The hosts put the extension's folder on sys.path while loading this file; added here too in case one does not.
_EXTENSION_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _EXTENSION_DIR not in sys.path:
    sys.path.append(_EXTENSION_DIR)

from modules import script_callbacks  # noqa: E402

import webui_ext  # noqa: E402

script_callbacks.on_app_started(webui_ext.on_app_started)
script_callbacks.on_ui_tabs(webui_ext.on_ui_tabs)
