"""ComfyUI glue of the pack: node definitions (`erase_nodes`) over thin modules split by concern: the model adapter
(`comfy_model`), files and weight patches (`comfy_files`), progress (`comfy_progress`) and the node API (`v3`)."""
