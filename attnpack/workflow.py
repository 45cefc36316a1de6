"""ComfyUI-style workflows with attnpack's node set: validate, then run.

API format: `{"id": {"class_type": ..., "inputs": {name: value | [node_id, output_index]}}}`. UI format:
ComfyUI's v0.4 (`nodes` with `widgets_values`, `links` as lists) and v1 (`links` as objects); both are
turned into the API format first. Validation happens before anything runs: an unknown class_type, a
missing or unknown input, a dangling link, a cycle or a type mismatch is a `WorkflowError` naming the node
id and the input.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import METHODS

# Literal input types, and the Python types each accepts.
LITERALS = {
    "STRING": (str,),
    "INT": (int,),
    "FLOAT": (int, float),
    "BOOLEAN": (bool,),
    "JSON": (list, dict, str, int, float, bool, type(None)),
}


class WorkflowError(ValueError):
    """A workflow that cannot run; the message names the node id and the input."""


@dataclass(frozen=True)
class Input:
    type: str  # a literal type above, or a link type: PIPELINE, RESULT, REPORT
    required: bool = True
    default: Any = None


@dataclass(frozen=True)
class Node:
    class_type: str
    inputs: dict[str, Input]
    outputs: tuple[str, ...]
    description: str


def _method_inputs(cls) -> dict[str, Input]:
    """A method node's inputs: the pipeline, then the method's settings with their defaults."""
    hints = typing.get_type_hints(cls)
    kinds = {int: "INT", float: "FLOAT", bool: "BOOLEAN", str: "STRING"}
    inputs = {"pipeline": Input("PIPELINE")}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        inputs[f.name] = Input(kinds.get(hints.get(f.name), "JSON"), False, default)
    return inputs


def _accepts(kind: str, value) -> bool:
    if value is None or kind == "JSON":
        return True
    if isinstance(value, bool) != (kind == "BOOLEAN"):
        return False
    return isinstance(value, LITERALS[kind])


def _node_name(method: str) -> str:
    return "attnpack.Apply" + "".join(part.capitalize() for part in method.split("_"))


GENERATION_INPUTS = {
    "pipeline": Input("PIPELINE"),
    "prompt": Input("STRING"),
    "seed": Input("INT", False, 0),
    "steps": Input("INT", False, None),
    "height": Input("INT", False, None),
    "width": Input("INT", False, None),
}
FIXED_NODES = (
    Node("attnpack.LoadPipeline", {"preset": Input("STRING")}, ("PIPELINE",), "a preset (attnpack presets)"),
    Node("attnpack.GenerateImage", GENERATION_INPUTS, ("RESULT",), "an image"),
    Node("attnpack.GenerateVideo", {**GENERATION_INPUTS, "frames": Input("INT", False, None)}, ("RESULT",), "a video"),
    Node("attnpack.CompareWithDense", {**GENERATION_INPUTS, "frames": Input("INT", False, None)}, ("RESULT",),
         "the methods' result beside the dense one, both timed"),
    Node("attnpack.SaveImage", {"result": Input("RESULT"), "filename": Input("STRING"),
                                "overwrite": Input("BOOLEAN", False, False)}, (), "PNG with the config"),
    Node("attnpack.SaveVideo", {"result": Input("RESULT"), "filename": Input("STRING"),
                                "overwrite": Input("BOOLEAN", False, False)}, (), "MP4 + JSON sidecar"),
    Node("attnpack.Evaluate", {"result": Input("RESULT")}, ("REPORT",),
         "fidelity to the dense result (PSNR) when compared, temporal flicker for videos"),
)  # fmt: skip


class NodeSet(Mapping):
    """The node set by class_type: the fixed nodes and an `attnpack.Apply<Method>` node per method in
    METHODS, read when asked, so that a method registered later (`register_method`) has its node."""

    def _table(self) -> dict[str, Node]:
        key = tuple(METHODS.items())
        if getattr(self, "_key", None) != key:
            methods = [Node(_node_name(name), _method_inputs(cls), ("PIPELINE",), f"apply {cls.__name__}")
                       for name, cls in METHODS.items()]  # fmt: skip
            nodes = [FIXED_NODES[0], *methods, *FIXED_NODES[1:]]
            self._key, self._nodes = key, {n.class_type: n for n in nodes}
        return self._nodes

    def __getitem__(self, class_type: str) -> Node:
        return self._table()[class_type]

    def __iter__(self):
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


NODES = NodeSet()


# ---- formats


def load(source: str | Path | dict) -> dict[str, dict]:
    """A workflow (path, JSON text or dict) in API format; UI formats are converted."""
    if isinstance(source, dict):
        data = source
    else:
        text = (
            Path(source).read_text()
            if Path(str(source)).suffix == ".json" or Path(str(source)).exists()
            else source
        )
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise WorkflowError(f"workflow is not JSON: {error}") from error
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        return from_ui(data)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise WorkflowError(
            "workflow must be API format {id: {class_type, inputs}} or UI format {nodes, links}"
        )
    return {str(k): v for k, v in data.items()}


def from_ui(data: dict) -> dict[str, dict]:
    """ComfyUI's UI format (v0.4 link lists or v1 link objects) as the API format."""
    links = {}
    for link in data["links"]:
        if isinstance(link, dict):
            links[link["id"]] = (str(link["origin_id"]), int(link["origin_slot"]))
        else:
            links[link[0]] = (str(link[1]), int(link[2]))
    api = {}
    for node in data["nodes"]:
        node_id, class_type = str(node.get("id")), node.get("type")
        spec = NODES.get(class_type)
        inputs: dict[str, Any] = {}
        linked = set()
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                if entry["link"] not in links:
                    raise WorkflowError(
                        f"node {node_id}: input {entry.get('name')!r} uses link {entry['link']}, which is not in links"
                    )
                inputs[entry["name"]] = list(links[entry["link"]])
                linked.add(entry["name"])
        if spec is not None:
            widgets = [
                name for name, inp in spec.inputs.items() if inp.type in LITERALS and name not in linked
            ]
            values = node.get("widgets_values", [])
            if isinstance(values, dict):
                inputs.update(values)
            else:
                inputs.update(dict(zip(widgets, values, strict=False)))
        api[node_id] = {"class_type": class_type, "inputs": inputs}
    return api


# ---- validation


def validate(workflow: dict[str, dict]) -> list[str]:
    """Check everything before running; returns the node ids in an order that runs them."""
    for node_id, node in workflow.items():
        spec = NODES.get(node.get("class_type"))
        if spec is None:
            raise WorkflowError(
                f"node {node_id}: class_type {node.get('class_type')!r} is not an attnpack node; known: {', '.join(NODES)}"
            )
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise WorkflowError(f"node {node_id}: inputs must be an object of name: value")
        for name in inputs:
            if name not in spec.inputs:
                raise WorkflowError(
                    f"node {node_id} ({spec.class_type}): unknown input {name!r}; accepted: {', '.join(spec.inputs)}"
                )
        for name, inp in spec.inputs.items():
            if name not in inputs:
                if inp.required:
                    raise WorkflowError(
                        f"node {node_id} ({spec.class_type}): missing input {name!r} ({inp.type})"
                    )
                continue
            value = inputs[name]
            if _is_link(value):
                source = workflow.get(str(value[0]))
                if source is None:
                    raise WorkflowError(
                        f"node {node_id}: input {name!r} links to node {value[0]!r}, which does not exist"
                    )
                outputs = NODES[source["class_type"]].outputs if source.get("class_type") in NODES else ()
                if not 0 <= value[1] < len(outputs):
                    raise WorkflowError(
                        f"node {node_id}: input {name!r} links to output {value[1]} of node {value[0]}, which has {len(outputs)}"
                    )
                if outputs[value[1]] != inp.type:
                    raise WorkflowError(
                        f"node {node_id}: input {name!r} wants {inp.type}, node {value[0]} gives {outputs[value[1]]}"
                    )
            elif inp.type not in LITERALS:
                raise WorkflowError(
                    f"node {node_id}: input {name!r} must be a link to a {inp.type} output, got {value!r}"
                )
            elif not _accepts(inp.type, value):
                raise WorkflowError(f"node {node_id}: input {name!r} wants {inp.type}, got {value!r}")
    return _order(workflow)


def _is_link(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str | int)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def _order(workflow) -> list[str]:
    order, state = [], {}

    def visit(node_id, path):
        if state.get(node_id) == "done":
            return
        if state.get(node_id) == "visiting":
            cycle = " -> ".join([*path[path.index(node_id) :], node_id])
            raise WorkflowError(f"node {node_id}: the links form a cycle ({cycle})")
        state[node_id] = "visiting"
        for value in workflow[node_id].get("inputs", {}).values():
            if _is_link(value):
                visit(str(value[0]), [*path, node_id])
        state[node_id] = "done"
        order.append(node_id)

    for node_id in workflow:
        visit(node_id, [])
    return order


# ---- running


@dataclass
class PipelineRef:
    preset: str
    pipe: Any
    methods: list[tuple[str, dict]] = field(default_factory=list)


def run(source, *, output_dir: str | Path = ".", pipelines: dict | None = None) -> dict[str, tuple]:
    """Validate and run a workflow; files land in `output_dir`. Returns each node's outputs by id."""
    from .api import apply
    from .pipelines import generate, load_preset, save

    workflow = load(source)
    order = validate(workflow)
    output_dir = Path(output_dir)
    cache = pipelines if pipelines is not None else {}
    results: dict[str, tuple] = {}
    for node_id in order:
        node = workflow[node_id]
        spec = NODES[node["class_type"]]
        values = {name: inp.default for name, inp in spec.inputs.items()}
        for name, value in node.get("inputs", {}).items():
            values[name] = results[str(value[0])][value[1]] if _is_link(value) else value
        kind = spec.class_type.removeprefix("attnpack.")
        if kind == "LoadPipeline":
            if values["preset"] not in cache:
                cache[values["preset"]] = load_preset(values["preset"])
            results[node_id] = (PipelineRef(values["preset"], cache[values["preset"]]),)
        elif kind.startswith("Apply"):
            ref = values["pipeline"]
            method = next(name for name in METHODS if _node_name(name) == spec.class_type)
            params = {k: values[k] for k in node.get("inputs", {}) if k != "pipeline"}  # given ones only
            results[node_id] = (PipelineRef(ref.preset, ref.pipe, [*ref.methods, (method, params)]),)
        elif kind in ("GenerateImage", "GenerateVideo", "CompareWithDense"):
            ref = values["pipeline"]
            # The generation runs through the last method with a pipeline of its own (long videos, several
            # subjects, trajectories); the other methods are applied around it.
            own = [m for m in ref.methods if METHODS[m[0]].needs.runner != "apply"]
            main = own[-1] if own else (ref.methods[-1] if ref.methods else ("dense", {}))
            handles = [
                apply(ref.pipe, name, **params) for name, params in ref.methods if (name, params) != main
            ]
            overrides = {
                "num_inference_steps": values["steps"],
                "height": values["height"],
                "width": values["width"],
            }
            if "frames" in values:
                overrides["num_frames"] = values["frames"]
            try:
                result = generate(
                    ref.preset, values["prompt"], method=main[0], params=main[1], seed=values["seed"], pipe=ref.pipe,
                    compare_dense=kind == "CompareWithDense", **overrides,
                )  # fmt: skip
            finally:
                for handle in reversed(handles):
                    handle.remove()
            result.config["methods"] = [name for name, _ in ref.methods]
            results[node_id] = (result,)
        elif kind in ("SaveImage", "SaveVideo"):
            save(values["result"], output_dir / values["filename"], overwrite=values["overwrite"])
            results[node_id] = ()
        elif kind == "Evaluate":
            results[node_id] = (evaluate(values["result"]),)
    return results


def evaluate(result) -> dict[str, float]:
    """PSNR against the dense result (when compared; attnpack.eval's, infinite when identical) and, for
    videos, VBench's temporal flickering (1 for a still video) and the raw mean frame difference (0-255)."""
    from .eval.metrics import frame_difference, psnr, temporal_flickering

    report: dict[str, float] = {"seconds": result.seconds}
    if result.dense_frames is not None:
        report["psnr_vs_dense"] = psnr(result.frames, result.dense_frames)
        report["speedup"] = result.speedup
    if len(result.frames) > 1:
        report["temporal_flickering"] = temporal_flickering(result.frames)
        report["frame_difference"] = frame_difference(result.frames)
    return report


def schema() -> dict:
    """JSON Schema of the API format restricted to attnpack's node set."""
    literal = {"STRING": {"type": "string"}, "INT": {"type": "integer"}, "FLOAT": {"type": "number"},
               "BOOLEAN": {"type": "boolean"}, "JSON": {}}  # fmt: skip
    link = {"type": "array", "prefixItems": [{"type": ["string", "integer"]}, {"type": "integer", "minimum": 0}],
            "minItems": 2, "maxItems": 2}  # fmt: skip
    nodes = []
    for spec in NODES.values():
        properties = {}
        for name, inp in spec.inputs.items():
            accepted = dict(literal[inp.type] if inp.type in LITERALS else link)
            if "type" in accepted and inp.type in LITERALS and not inp.required and inp.default is None:
                accepted["type"] = [accepted["type"], "null"]  # optional: null keeps the preset's value
            properties[name] = accepted | {"description": inp.type}
        nodes.append({
            "properties": {"class_type": {"const": spec.class_type}, "inputs": {
                "type": "object", "properties": properties, "additionalProperties": False,
                "required": [n for n, i in spec.inputs.items() if i.required]}},
            "required": ["class_type", "inputs"], "description": spec.description,
        })  # fmt: skip
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "attnpack workflow (ComfyUI API format)",
        "type": "object",
        "additionalProperties": {"oneOf": nodes},
    }
