"""ESD concept erasure: ComfyUI custom nodes (V3 API).

Import-light on purpose: ComfyUI imports every pack at startup, so the nodes (and torch-heavy code) load only when
ComfyUI asks for them through `comfy_entrypoint`.
"""


async def comfy_entrypoint():
    from .nodes.erase_nodes import ESDExtension

    return ESDExtension()
