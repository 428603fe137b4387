"""fp32 -> fp16 ONNX with care for overflow: layers whose values leave fp16's range stay fp32.

The conversion itself is onnxruntime's float16 converter (`onnxruntime.transformers.float16`, the
maintained successor of onnxconverter-common's, used by Olive). What it cannot know is which
activations overflow fp16 (max 65504) on real data; this module measures that by running the fp32
graph on real inputs with every intermediate tensor exposed, and keeps every node that reads or
writes a tensor within `HEADROOM` of the limit in fp32. Inputs and outputs stay float32
(`keep_io_types`), so a consumer can swap an fp16 file in without changing its code.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

FP16_MAX = 65504.0
# Real data seen at export time is a sample: unseen inputs can go further, so a tensor that comes
# within 4x of the limit already counts as overflowing.
HEADROOM = 4.0


@dataclass(frozen=True)
class BlockedNode:
    """A node kept in fp32, the PyTorch layer it came from, and the largest |value| it touched."""

    node: str
    op_type: str
    layer: str
    max_abs: float

    def describe(self) -> str:
        return f"{self.layer} ({self.op_type} {self.node}, max |value| {self.max_abs:.3g})"


def layer_name(node: onnx.NodeProto) -> str:
    """The PyTorch module a node came from (the dynamo exporter records its name scopes)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in ast.literal_eval(prop.value) if s]
            if len(scopes) >= 2:
                return scopes[-2]
            if scopes:
                return scopes[-1]
    return node.name


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name: the converter's block list is by name."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)


def tensor_ranges(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """max |value| of every float tensor (inputs, intermediates, outputs, weights) over `feeds`.

    Runs the fp32 graph in onnxruntime on the CPU with every intermediate made a graph output.
    A NaN or Inf counts as infinitely large.
    """
    import onnxruntime as ort

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    probe = onnx.ModelProto()
    probe.CopyFrom(inferred)
    outputs = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            info = types.get(name)
            if name and name not in outputs and info is not None \
                    and info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
                probe.graph.output.append(info)
                outputs.add(name)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    ranges: dict[str, float] = {}
    for feed in feeds:
        values = dict(zip(names, session.run(names, feed)))
        values.update(feed)
        for name, value in values.items():
            if value.dtype == np.float32:
                finite = np.isfinite(value).all()
                biggest = float(np.abs(value).max()) if finite and value.size else (0.0 if finite else np.inf)
                ranges[name] = max(ranges.get(name, 0.0), biggest)
    for initializer in model.graph.initializer:
        if initializer.data_type == onnx.TensorProto.FLOAT:
            weights = numpy_helper.to_array(initializer)
            ranges[initializer.name] = float(np.abs(weights).max()) if weights.size else 0.0
    return ranges


def overflowing_nodes(model: onnx.ModelProto, ranges: dict[str, float],
                      limit: float = FP16_MAX / HEADROOM) -> list[BlockedNode]:
    """Nodes that read or write a float tensor larger than `limit` in absolute value."""
    blocked = []
    for node in model.graph.node:
        touched = [ranges.get(name, 0.0) for name in [*node.input, *node.output] if name]
        biggest = max(touched, default=0.0)
        if biggest > limit:
            blocked.append(BlockedNode(node.name, node.op_type, layer_name(node), biggest))
    return blocked


def convert_to_fp16(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                    *, guard_overflow: bool = True) -> tuple[onnx.ModelProto, list[BlockedNode]]:
    """fp16 copy of `model` with float32 inputs/outputs; overflowing nodes stay fp32.

    `feeds` are real inputs (lists of {input name: float32 array}) that decide which nodes
    overflow. `guard_overflow=False` converts every node (only to show what the guard prevents).
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    source = onnx.ModelProto()
    source.CopyFrom(model)
    _name_nodes(source)
    blocked = overflowing_nodes(source, tensor_ranges(source, feeds)) if guard_overflow else []
    converted = convert_float_to_float16(
        source, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST),
        node_block_list=[b.node for b in blocked])
    bypass_round_trips(converted.graph)
    topological_sort(converted.graph)
    return converted, blocked


def _cast_to(node: onnx.NodeProto) -> int | None:
    if node.op_type != "Cast":
        return None
    return next((a.i for a in node.attribute if a.name == "to"), None)


def bypass_round_trips(graph: onnx.GraphProto) -> None:
    """Remove fp32 -> fp16 -> fp32 round trips between nodes kept in fp32 (in place).

    The converter casts every blocked node's output to fp16 and back to fp32 before the next
    blocked node: a value out of fp16's range becomes Inf on the way, which is the overflow the
    block list was meant to avoid. It also emits one identical Cast per consumer under one name.
    Each Cast-to-fp32 whose input comes from a Cast-to-fp16 here reads the original fp32 tensor.
    """
    nodes, seen = [], set()
    for node in graph.node:
        key = node.SerializeToString()
        if key not in seen:
            seen.add(key)
            nodes.append(node)
    producer = {name: node for node in nodes for name in node.output}
    outputs = {o.name for o in graph.output}
    rename = {}
    for node in nodes:
        source = producer.get(node.input[0]) if node.input else None
        if _cast_to(node) == onnx.TensorProto.FLOAT and source is not None \
                and _cast_to(source) == onnx.TensorProto.FLOAT16 and node.output[0] not in outputs:
            rename[node.output[0]] = source.input[0]
    for node in nodes:
        for index, name in enumerate(node.input):
            if name in rename:
                node.input[index] = rename[name]
    while True:  # drop nodes nobody reads any more
        used = {name for node in nodes for name in node.input} | outputs
        kept = [node for node in nodes if any(name in used for name in node.output)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    copies = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copies.append(copy)
    del graph.node[:]
    graph.node.extend(copies)
    del graph.value_info[:]  # the converter's types no longer fit the rewired tensors; inference redoes them


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after its inputs' producers (in place).

    The converter appends the Cast nodes of `keep_io_types` at the end of the list, which the ONNX
    checker rejects (onnxconverter-common issue 208).
    """
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise ValueError(f"graph {graph.name}: cycle or missing input among {[n.name for n in pending]}")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    copies = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)
