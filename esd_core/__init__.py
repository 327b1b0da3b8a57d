"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023), as a torch library.

Import-light on purpose: ComfyUI imports the pack at startup, so heavy modules load only when used.
"""
__version__ = "0.1.0"
