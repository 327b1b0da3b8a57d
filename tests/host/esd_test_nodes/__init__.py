"""Test-only ComfyUI nodes, loaded next to the pack by the hardening tests' own servers (never shipped, never in the
session server): a MODEL whose training passes fail like a full GPU, and a probe of the tensors alive in the host.

They use ComfyUI's plain V1 node API so that nothing of the pack is involved in making the failure.
"""
import gc

import torch

import comfy.sd
import folder_paths


class ESDTestOutOfMemoryModel:
    """A fresh copy of a checkpoint's MODEL (not shared with any loader's cache) whose UNet raises
    torch.OutOfMemoryError on its ``fail_at``-th forward pass with autograd on (a training pass; sampling and the
    frozen teacher run without autograd), after allocating ``allocate_mb`` as a real failing run would have."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),),
                             "fail_at": ("INT", {"default": 1, "min": 1, "max": 1000}),
                             "allocate_mb": ("INT", {"default": 64, "min": 0, "max": 4096})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, ckpt_name, fail_at, allocate_mb):
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        model = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]
        unet = model.model.diffusion_model
        forward = unet.forward
        passes = [0]

        def failing_forward(*args, **kwargs):
            if torch.is_grad_enabled():
                passes[0] += 1
                if passes[0] >= fail_at:
                    held = torch.empty(allocate_mb * 2**20, dtype=torch.uint8)  # noqa: F841  (what a pass holds)
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total "
                                                 "capacity of 7.79 GiB of which 1.02 GiB is free.")
            return forward(*args, **kwargs)

        unet.forward = failing_forward
        return (model,)


class ESDTestFp8Model:
    """A checkpoint's MODEL with its UNet weights stored in float8_e4m3fn, as UNETLoader's weight_dtype option loads
    one (the same model option)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, ckpt_name):
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        model = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False,
                                                      model_options={"dtype": torch.float8_e4m3fn})[0]
        return (model,)


class ESDTestLiveTensors:
    """Output node: the bytes of every distinct tensor storage alive in the host process (after a gc); ``after``
    (anything) makes it run after that node in the same prompt."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"label": ("STRING", {"default": ""})}, "optional": {"after": ("*",)}}

    @classmethod
    def VALIDATE_INPUTS(cls, input_types=None, **kwargs):
        return True  # "after" takes any type

    @classmethod
    def IS_CHANGED(cls, label, after=None):
        return float("nan")  # never cached: each prompt measures anew

    RETURN_TYPES = ()
    FUNCTION = "measure"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def measure(self, label, after=None):
        gc.collect()
        storages = {}
        # Tensors are not tracked by the garbage collector themselves: find them among what tracked objects (dicts,
        # lists, modules, frames) refer to, and their gradients.
        for holder in gc.get_objects():
            for obj in gc.get_referents(holder):
                if issubclass(type(obj), torch.Tensor):
                    for t in (obj, obj.grad if obj.is_leaf else None):
                        if t is None or t.device.type == "meta":
                            continue
                        try:
                            storage = t.untyped_storage()
                        except (RuntimeError, NotImplementedError):
                            continue
                        storages[storage.data_ptr()] = storage.nbytes()
        return {"ui": {"text": [str(sum(storages.values()))]}}


NODE_CLASS_MAPPINGS = {"ESDTestOutOfMemoryModel": ESDTestOutOfMemoryModel, "ESDTestFp8Model": ESDTestFp8Model,
                       "ESDTestLiveTensors": ESDTestLiveTensors}
