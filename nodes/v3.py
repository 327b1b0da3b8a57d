"""The ComfyUI node API version the pack is written against (V3), behind one import so an API bump is one change."""
from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401  (re-exported for the node modules)
