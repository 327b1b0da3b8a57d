"""Load a ComfyUI node pack the way ComfyUI does, under an audit hook, and print as JSON what the pack did.

    python tests/import_probe.py COMFY_DIR PACK_DIR

The host modules a pack builds on (torch, ComfyUI's own) are imported first, as ComfyUI has them loaded before it
loads any pack; then the hook (`sys.addaudithook`) watches the pack's import, its entry point and every node's schema
(what registering its nodes runs). An event counts when a frame of the pack is on the stack (so what the pack's own
imports do counts too); ``exec``/``compile`` count when the pack calls them directly (every import executes modules).
Prints {"events": [[event, detail], ...], "nodes": [node ids]}. Used by tests/test_import_audit.py.
"""
import asyncio
import importlib.util
import json
import os
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
NETWORK = ("socket.", "urllib.Request", "http.client.", "ftplib.", "smtplib.", "webbrowser.")
PROCESSES = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
             "pty.spawn", "os.startfile", "ctypes.dlopen")
FILE_CHANGES = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link", "os.truncate",
                "os.chmod", "os.chown", "os.utime", "shutil.", "os.removexattr", "os.setxattr")
CODE = ("exec", "compile")


def main(comfy_dir: str, pack_dir: str) -> None:
    sys.dont_write_bytecode = True  # importing must not be seen writing .pyc files
    sys.path.insert(0, comfy_dir)
    pack_dir = os.path.realpath(pack_dir)
    import comfy.options

    sys.argv = ["main.py", "--cpu"]  # as the tests' server runs; the probe never touches a GPU
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (the host, loaded before any pack)
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.utils  # noqa: F401
    import comfy_api.latest  # noqa: F401
    import comfy_execution.utils  # noqa: F401
    import folder_paths  # noqa: F401
    import latent_preview  # noqa: F401
    import torch  # noqa: F401

    me = os.path.realpath(__file__)
    events = []

    def in_pack(filename: str) -> bool:
        """The pack's own code: files under its folder, but not this probe and not hidden folders inside it (a
        checkout's .venv or host folders hold libraries, which may compile or write what they like)."""
        path = os.path.realpath(filename) if filename and not filename.startswith("<") else ""
        if not path.startswith(pack_dir + os.sep) or path == me:
            return False
        return not os.path.relpath(path, pack_dir).startswith(".")

    def hook(event: str, args) -> None:
        if event in CODE:
            caller = sys._getframe(1)
            if in_pack(caller.f_code.co_filename):
                events.append([event, caller.f_code.co_filename])
            return
        watched = event.startswith(NETWORK + PROCESSES + FILE_CHANGES)
        if event == "open":
            mode, flags = args[1], args[2]
            watched = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & WRITE_FLAGS)
        if not watched:
            return
        frame = sys._getframe(1)
        while frame is not None:
            if in_pack(frame.f_code.co_filename):
                events.append([event, repr(args)[:200]])
                return
            frame = frame.f_back

    sys.addaudithook(hook)
    name = os.path.basename(pack_dir)
    spec = importlib.util.spec_from_file_location(name, os.path.join(pack_dir, "__init__.py"),
                                                  submodule_search_locations=[pack_dir])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    nodes = []
    if hasattr(module, "comfy_entrypoint"):
        async def register():
            extension = await module.comfy_entrypoint()
            await extension.on_load()
            return await extension.get_node_list()
        for node in asyncio.run(register()):
            nodes.append(node.define_schema().node_id)
    for key in getattr(module, "NODE_CLASS_MAPPINGS", {}):
        nodes.append(key)
    print(json.dumps({"events": events, "nodes": nodes}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
