"""One small ONNX model per (graph kind, dtype, rank, attributes), built with ``onnx.helper``.

Every model is one normalization node, preceded for the residual kinds by ``Mul`` and ``Add``.
All inputs are graph inputs (no initializers), with symbolic sizes, so one model serves every
shape of its rank. Optional ONNX inputs (scale, bias) are always present: the adapter feeds ones
and zeros where the caller passes ``None``.

=======================  =====================================================  =========
kind                     graph                                                  opset
=======================  =====================================================  =========
``layer_norm``           Y = LayerNormalization(X, Scale, B)                    17
``rms_norm``             Y = RMSNormalization(X, Scale)                          23
``group_norm``           Y = GroupNormalization(X, Scale, B), per-channel       21
``instance_norm``        Y = InstanceNormalization(X, Scale, B)                 17
``batch_norm``           Y = BatchNormalization(X, Scale, B, Mean, Var)         15
``batch_norm_train``     Y, Mean', Var' = BatchNormalization(..., training=1)   15
``deep_norm``            Z = Add(Mul(X, Alpha), S); Y = LayerNormalization(Z)   17
``fused_add_rms_norm``   Z = Add(X, Mul(R, Alpha)); Y = RMSNormalization(Z)     23
``fused_add_layer_norm`` Z = Add(X, Mul(R, Alpha)); Y = LayerNormalization(Z)   17
=======================  =====================================================  =========

Each kind uses the lowest opset with the semantics wanted (GroupNormalization 21: scale and bias
per channel, not per group as in 18). Multiplying by ``Alpha = 1`` is exact, so with the default
alpha the sum is rounded once; any other alpha is rounded into the input dtype and the product is
rounded before the sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx
from onnx import TensorProto, helper

ELEMENT_TYPES = {
    "float64": TensorProto.DOUBLE,
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
}
#: The IR version written into the models: old enough for every onnxruntime that runs opset 23.
IR_VERSION = 10

_NORM_NODES = {
    "layer_norm": ("LayerNormalization", ("Z", "Scale", "B"), 17),
    "rms_norm": ("RMSNormalization", ("Z", "Scale"), 23),
    "group_norm": ("GroupNormalization", ("Z", "Scale", "B"), 21),
    "instance_norm": ("InstanceNormalization", ("Z", "Scale", "B"), 17),
    "batch_norm": ("BatchNormalization", ("Z", "Scale", "B", "Mean", "Var"), 15),
    "batch_norm_train": ("BatchNormalization", ("Z", "Scale", "B", "Mean", "Var"), 15),
    "deep_norm": ("LayerNormalization", ("Z", "Scale", "B"), 17),
    "fused_add_rms_norm": ("RMSNormalization", ("Z", "Scale"), 23),
    "fused_add_layer_norm": ("LayerNormalization", ("Z", "Scale", "B"), 17),
}
KINDS = tuple(_NORM_NODES)


@dataclass(frozen=True)
class GraphKey:
    """Everything that makes one model differ from another; hashable, the session cache key.

    ``param_rank``: rank of Scale/B (1 for the per-channel norms); ``attributes``: sorted
    ``(name, value)`` pairs of the normalization node.
    """

    kind: str
    dtype: str
    rank: int
    param_rank: int
    attributes: tuple[tuple[str, Any], ...] = field(default=())


def input_names(kind: str) -> tuple[str, ...]:
    """The graph inputs of ``kind``, in the order the adapter binds them."""
    norm_inputs = _NORM_NODES[kind][1][1:]
    if kind == "deep_norm":
        return ("X", "S", "Alpha", *norm_inputs)
    if kind.startswith("fused_add"):
        return ("X", "R", "Alpha", *norm_inputs)
    return ("X", *norm_inputs)


def output_names(kind: str) -> tuple[str, ...]:
    if kind == "batch_norm_train":
        return ("Y", "MeanOut", "VarOut")
    if kind.startswith("fused_add"):
        return ("Y", "Z")
    return ("Y",)


def build(key: GraphKey) -> bytes:
    """The serialized, checked model of ``key``."""
    element = ELEMENT_TYPES[key.dtype]
    op, norm_inputs, opset = _NORM_NODES[key.kind]
    nodes = [*_residual_nodes(key.kind)]
    inputs = ["X" if name == "Z" and not nodes else name for name in norm_inputs]
    outputs = list(output_names(key.kind))
    norm_outputs = ["Y", "MeanOut", "VarOut"] if key.kind == "batch_norm_train" else ["Y"]
    nodes.append(helper.make_node(op, inputs, norm_outputs, **dict(key.attributes)))
    graph = helper.make_graph(
        nodes,
        key.kind,
        [_value(name, element, _rank(name, key)) for name in input_names(key.kind)],
        [_value(name, element, _rank(name, key)) for name in outputs],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION
    )
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _residual_nodes(kind: str) -> list[onnx.NodeProto]:
    if kind == "deep_norm":  # Z = Alpha * X + S
        return [
            helper.make_node("Mul", ["X", "Alpha"], ["Scaled"]),
            helper.make_node("Add", ["Scaled", "S"], ["Z"]),
        ]
    if kind.startswith("fused_add"):  # Z = X + Alpha * R
        return [
            helper.make_node("Mul", ["R", "Alpha"], ["Scaled"]),
            helper.make_node("Add", ["X", "Scaled"], ["Z"]),
        ]
    return []


def _rank(name: str, key: GraphKey) -> int:
    if name in ("X", "S", "R", "Y", "Z"):
        return key.rank
    if name == "Alpha":
        return 0
    if name in ("Scale", "B"):
        return key.param_rank
    return 1  # per-channel statistics


def _value(name: str, element: int, rank: int) -> onnx.ValueInfoProto:
    # Symbolic sizes: one model serves every shape of this rank.
    return helper.make_tensor_value_info(name, element, [f"{name}_{i}" for i in range(rank)])
