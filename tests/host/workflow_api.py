"""Convert a workflow in ComfyUI's UI format (what workflows/ ships) to the API format that POST /prompt takes.

Widget values are matched to input names with the server's own /object_info (its `input_order`), so the test runs
exactly what a user gets when they load the workflow. Frontend-only nodes (notes) are dropped.
"""
from __future__ import annotations

FRONTEND_ONLY = {"MarkdownNote", "Note"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def widget_names(info: dict) -> list[tuple[str, bool]]:
    """(input name, has a control_after_generate value) for each widget input, in widget order."""
    spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    order = info.get("input_order", {})
    names = order.get("required", []) + order.get("optional", [])
    out = []
    for name in names:
        type_, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
        if isinstance(type_, list) or type_ in WIDGET_TYPES:
            # the frontend's own rule (1.32.9): an INT named seed/noise_seed gets a control value unless the node
            # says control_after_generate=False
            default_control = type_ == "INT" and name in ("seed", "noise_seed")
            out.append((name, bool(opts.get("control_after_generate", default_control))))
    return out


def to_api(workflow: dict, object_info: dict, overrides: dict | None = None) -> dict:
    """API prompt for ``workflow``; ``overrides`` maps node type -> {input: value} applied to every node of that type
    (the tests shrink sizes and iterations to CPU scale with it)."""
    overrides = overrides or {}
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        type_ = node["type"]
        if type_ in FRONTEND_ONLY:
            continue
        inputs = {}
        values = list(node.get("widgets_values", []))
        for name, has_control in widget_names(object_info[type_]):
            if not values:
                break
            inputs[name] = values.pop(0)
            if has_control:
                values.pop(0)  # "fixed" / "randomize" belongs to the frontend
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, src, slot, _, _, _ = links[inp["link"]]
                inputs[inp["name"]] = [str(src), slot]
        inputs.update(overrides.get(type_, {}))
        prompt[str(node["id"])] = {"class_type": type_, "inputs": inputs}
    return prompt
