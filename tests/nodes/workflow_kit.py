"""ComfyUI's UI (litegraph) workflow format for the example workflows: node schemas, a graph builder, a checker for
links and widget values, and a small in-process executor for the tests (`build_example_workflows.py` uses it).

Core ComfyUI nodes are described by copies of the parts of their schemas the workflows use (ComfyUI is not
importable in the tests); `CORE_NODES` lists them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from make_example_models import SD15_NAME

from metaqueries_core.comfy_files import INPUT_IMAGES
from nodes import NODE_CLASS_MAPPINGS

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
ANY = "*"
# Widgets the frontend adds after an input: (input option that triggers it, widget name, value we save).
FRONTEND_WIDGETS = (("control_after_generate", "control_after_generate", "fixed"), ("image_upload", "upload", "image"))
VIRTUAL_NODES = {"Note", "MarkdownNote"}  # frontend-only: never sent to the server
WORKFLOW_DIR = Path(__file__).resolve().parents[2] / "example_workflows"


# ---- schemas ---------------------------------------------------------------------------------------------------
class _Schema:
    """A core node's schema, as far as the workflows use it (copied from ComfyUI's nodes.py / comfy_extras)."""

    def __init__(self, inputs: dict, outputs: tuple[str, ...], names: tuple[str, ...] | None = None) -> None:
        self._inputs, self.RETURN_TYPES, self.RETURN_NAMES = inputs, outputs, names or outputs

    def INPUT_TYPES(self) -> dict:
        return self._inputs


SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_sde", "ddim", "uni_pc"]  # a subset
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal"]  # a subset
_INT = {"min": 0, "max": 0xFFFFFFFFFFFFFFFF}
CORE_NODES: dict[str, _Schema] = {
    "LoadImage": _Schema({"required": {"image": (list(INPUT_IMAGES), {"image_upload": True})}}, ("IMAGE", "MASK")),
    "SaveImage": _Schema({"required": {"images": ("IMAGE", {}), "filename_prefix": ("STRING", {})}}, ()),
    "PreviewImage": _Schema({"required": {"images": ("IMAGE", {})}}, ()),
    "PreviewAny": _Schema({"required": {"source": (ANY, {})}}, ()),
    "CheckpointLoaderSimple": _Schema({"required": {"ckpt_name": ([SD15_NAME], {})}}, ("MODEL", "CLIP", "VAE")),
    "EmptyLatentImage": _Schema(
        {
            "required": {
                "width": ("INT", {"min": 16, "max": 16384, "step": 8}),
                "height": ("INT", {"min": 16, "max": 16384, "step": 8}),
                "batch_size": ("INT", {"min": 1, "max": 4096}),
            }
        },
        ("LATENT",),
    ),
    "KSampler": _Schema(
        {
            "required": {
                "model": ("MODEL", {}),
                "seed": ("INT", {**_INT, "control_after_generate": True}),
                "steps": ("INT", {"min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"min": 0.0, "max": 100.0}),
                "sampler_name": (SAMPLERS, {}),
                "scheduler": (SCHEDULERS, {}),
                "positive": ("CONDITIONING", {}),
                "negative": ("CONDITIONING", {}),
                "latent_image": ("LATENT", {}),
                "denoise": ("FLOAT", {"min": 0.0, "max": 1.0}),
            }
        },
        ("LATENT",),
    ),
    "VAEDecode": _Schema({"required": {"samples": ("LATENT", {}), "vae": ("VAE", {})}}, ("IMAGE",)),
    "Note": _Schema({"required": {"text": ("STRING", {"multiline": True})}}, ()),
}


@dataclass(frozen=True)
class Input:
    name: str
    type: str  # "COMBO" for a list of choices
    options: dict
    required: bool
    choices: tuple | None = None

    @property
    def is_widget(self) -> bool:
        return self.choices is not None or self.type in WIDGET_TYPES


@dataclass(frozen=True)
class Spec:
    inputs: tuple[Input, ...]
    outputs: tuple[tuple[str, str], ...]  # (name, type)
    widgets: tuple[tuple[str, Input | None], ...]  # in frontend order; None = a widget only the frontend has

    @property
    def sockets(self) -> tuple[Input, ...]:
        return tuple(i for i in self.inputs if not i.is_widget)


def spec_of(node_type: str) -> Spec:
    schema = NODE_CLASS_MAPPINGS.get(node_type) or CORE_NODES.get(node_type)
    if schema is None:
        raise KeyError(f"unknown node type {node_type!r}")
    declared = schema.INPUT_TYPES()
    inputs, widgets = [], []
    for section in ("required", "optional"):
        for name, (kind, *rest) in declared.get(section, {}).items():
            options = rest[0] if rest else {}
            choices = tuple(kind) if isinstance(kind, (list, tuple)) else None
            inp = Input(name, "COMBO" if choices is not None else kind, options, section == "required", choices)
            inputs.append(inp)
            if inp.is_widget:
                widgets.append((name, inp))
                widgets += [(w, None) for opt, w, _ in FRONTEND_WIDGETS if options.get(opt)]
    names = getattr(schema, "RETURN_NAMES", None) or schema.RETURN_TYPES
    return Spec(tuple(inputs), tuple(zip(names, schema.RETURN_TYPES)), tuple(widgets))


# ---- builder ---------------------------------------------------------------------------------------------------
@dataclass
class Graph:
    nodes: list[dict] = field(default_factory=list)
    links: list[list] = field(default_factory=list)

    def add(self, node_type: str, pos: tuple[int, int], box: int = 320, title: str | None = None, **values) -> dict:
        spec = spec_of(node_type)
        frontend = {w: v for _, w, v in FRONTEND_WIDGETS}
        widget_values = []
        for name, inp in spec.widgets:
            if inp is None:
                widget_values.append(frontend[name])
            elif name in values:
                widget_values.append(values.pop(name))
            else:
                widget_values.append(inp.options.get("default", inp.choices[0] if inp.choices else None))
        if values:
            raise KeyError(f"{node_type} has no widgets {sorted(values)}")
        multiline = sum(bool(i and i.options.get("multiline")) for _, i in spec.widgets)
        rows = max(len(spec.sockets), len(spec.outputs)) + len(spec.widgets)
        preview = 160 if any(i and i.options.get("image_upload") for _, i in spec.widgets) else 0  # the loaded image
        node = {
            "id": len(self.nodes) + 1,
            "type": node_type,
            "pos": list(pos),
            "size": [box, 40 + 26 * rows + 90 * multiline + preview],
            "flags": {},
            "order": len(self.nodes),
            "mode": 0,
            "inputs": [{"name": i.name, "type": i.type, "link": None} for i in spec.sockets],
            "outputs": [{"name": n, "type": t, "links": []} for n, t in spec.outputs],
            "properties": {"Node name for S&R": node_type},
            "widgets_values": widget_values,
        }
        if title:
            node["title"] = title
        if node_type in VIRTUAL_NODES:
            node.update(color="#432", bgcolor="#653", properties={}, size=[box, 250])
        self.nodes.append(node)
        return node

    def connect(self, src: dict, output: str, dst: dict, input_name: str) -> None:
        slot = next(i for i, o in enumerate(src["outputs"]) if o["name"] == output)
        dst_slot = next(i for i, o in enumerate(dst["inputs"]) if o["name"] == input_name)
        link_id = len(self.links) + 1
        link_type = src["outputs"][slot]["type"]
        self.links.append([link_id, src["id"], slot, dst["id"], dst_slot, link_type])
        src["outputs"][slot]["links"].append(link_id)
        src["outputs"][slot]["slot_index"] = slot
        dst["inputs"][dst_slot]["link"] = link_id

    def view(self, screen: tuple[int, int] = (1600, 1000), top_left: tuple[int, int] = (80, 100)) -> dict:
        """Canvas scale and offset that show the whole graph when it is opened on a screen of this size, clear of
        the side bar and the top bar (`top_left` pixels); litegraph draws a node at (pos + offset) * scale."""
        x0 = min(n["pos"][0] for n in self.nodes)
        y0 = min(n["pos"][1] for n in self.nodes) - 30  # title bars sit above pos
        x1 = max(n["pos"][0] + n["size"][0] for n in self.nodes)
        y1 = max(n["pos"][1] + n["size"][1] for n in self.nodes)
        room = (screen[0] - top_left[0] - 20, screen[1] - top_left[1] - 20)
        scale = round(min(1.0, room[0] / (x1 - x0), room[1] / (y1 - y0)), 2)
        return {"scale": scale, "offset": [round(top_left[0] / scale - x0), round(top_left[1] / scale - y0)]}

    def to_json(self, name: str) -> dict:
        for order, node in enumerate(topological(self.nodes, self.links)):
            node["order"] = order
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-metaqueries/{name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": self.view()},
            "version": 0.4,
        }


def topological(nodes: list[dict], links: list[list]) -> list[dict]:
    """Nodes ordered so that every link goes forward; raises on a cycle."""
    by_id = {n["id"]: n for n in nodes}
    deps = {n["id"]: {src for _, src, _, dst, _, _ in links if dst == n["id"]} for n in nodes}
    done: list[int] = []
    while len(done) < len(nodes):
        ready = [i for i in by_id if i not in done and deps[i] <= set(done)]
        if not ready:
            raise ValueError(f"the graph has a cycle among nodes {sorted(set(by_id) - set(done))}")
        done += sorted(ready)
    return [by_id[i] for i in done]


# ---- checks and execution --------------------------------------------------------------------------------------
def widget_values(node: dict) -> dict[str, Any]:
    """The values of a node's real (server-side) widgets by input name."""
    spec = spec_of(node["type"])
    values = node.get("widgets_values") or []
    return {name: v for (name, inp), v in zip(spec.widgets, values) if inp is not None}


def check_widget(node_type: str, inp: Input, value: Any) -> str | None:
    where = f"{node_type}.{inp.name} = {value!r}"
    if inp.choices is not None:
        return None if value in inp.choices else f"{where} is not one of {list(inp.choices)}"
    kinds = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}
    if not isinstance(value, kinds[inp.type]) or (inp.type != "BOOLEAN" and isinstance(value, bool)):
        return f"{where} is not a {inp.type}"
    lo, hi = inp.options.get("min"), inp.options.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        return f"{where} is outside [{lo}, {hi}]"
    return None


def check_workflow(doc: dict) -> list[str]:
    """Problems in a UI workflow: unknown node types, links whose types disagree with the schemas, widget values
    out of range or not among the choices, required sockets left open. Empty when the workflow is sound."""
    problems = []
    nodes = {n["id"]: n for n in doc["nodes"]}
    for node in doc["nodes"]:
        t = node["type"]
        if t not in NODE_CLASS_MAPPINGS and t not in CORE_NODES:
            problems.append(f"node {node['id']}: unknown type {t!r}")
            continue
        spec = spec_of(t)
        if t != "PreviewAny" and len(node.get("widgets_values") or []) != len(spec.widgets):
            problems.append(
                f"node {node['id']} {t}: {len(node.get('widgets_values') or [])} widget values, "
                f"expected {len(spec.widgets)} ({[w for w, _ in spec.widgets]})"
            )
        for (_, inp), value in zip(spec.widgets, node.get("widgets_values") or []):
            if inp is not None and (problem := check_widget(t, inp, value)):
                problems.append(f"node {node['id']}: {problem}")
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for inp in spec.sockets:
            if inp.required and inp.name not in linked and t not in VIRTUAL_NODES:
                problems.append(f"node {node['id']} {t}: required input {inp.name!r} is not connected")
    for link_id, src, src_slot, dst, dst_slot, link_type in doc["links"]:
        s, d = nodes.get(src), nodes.get(dst)
        if s is None or d is None:
            problems.append(f"link {link_id}: missing node {src if s is None else dst}")
            continue
        out_name, out_type = spec_of(s["type"]).outputs[src_slot]
        in_name = d["inputs"][dst_slot]["name"]
        inp = next((i for i in spec_of(d["type"]).sockets if i.name == in_name), None)
        if inp is None:
            problems.append(f"link {link_id}: {d['type']} has no socket input {in_name!r}")
            continue
        if link_type != out_type or inp.type not in (out_type, ANY):
            problems.append(
                f"link {link_id}: {s['type']}.{out_name} ({out_type}) -> {d['type']}.{in_name} ({inp.type}) "
                f"declared {link_type}"
            )
        if s["outputs"][src_slot]["type"] != out_type or link_id not in s["outputs"][src_slot]["links"]:
            problems.append(f"link {link_id}: node {src} output slot {src_slot} does not list it as {out_type}")
        if d["inputs"][dst_slot].get("link") != link_id:
            problems.append(f"link {link_id}: node {dst} input {in_name!r} does not point back to it")
    return problems


def execute(doc: dict, stand_ins: dict[str, Callable[..., tuple]]) -> dict[int, tuple]:
    """Run a UI workflow in-process: the pack's nodes for real, core nodes through `stand_ins` (type -> function of
    the node's inputs). Returns every node's outputs by node id."""
    links = {link[0]: link for link in doc["links"]}
    results: dict[int, tuple] = {}
    for node in topological(doc["nodes"], doc["links"]):
        t = node["type"]
        if t in VIRTUAL_NODES:
            continue
        kwargs = widget_values(node)
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, src, slot, *_ = links[inp["link"]]
                kwargs[inp["name"]] = results[src][slot]
        if t in NODE_CLASS_MAPPINGS:
            cls = NODE_CLASS_MAPPINGS[t]
            results[node["id"]] = getattr(cls(), cls.FUNCTION)(**kwargs)
        else:
            results[node["id"]] = stand_ins[t](**kwargs)
    return results
