"""ESD concept erasure: ComfyUI custom nodes (V3 API).

Import-light on purpose: ComfyUI imports every pack at startup, so the nodes (and torch-heavy code) load only when
ComfyUI asks for them through `comfy_entrypoint`.
"""

# The frontend extension (live training view) and the node help pages (docs/<node id>.md), served by ComfyUI at
# /extensions/<this folder's name>/; every .js file under it is loaded by the browser.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.erase_nodes import ESDExtension

    return ESDExtension()
