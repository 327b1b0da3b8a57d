"""ComfyUI glue of the pack: node definitions (`erase_nodes`) over one ComfyUI adapter module (`comfy_bridge`)."""
