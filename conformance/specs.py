"""What each norm is to the engine: its reference functions, its arguments, its outputs.

A :class:`NormSpec` knows, for one norm, how to turn a case's inputs into the positional call
an adapter receives (``torch.nn.functional``'s order, see :mod:`impls.adapter`), the matching
call of the correctly rounded reference, and which outputs and gradients there are to compare.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import references

#: The convention keywords an adapter may declare, and their defaults (PyTorch's).
CONVENTION_DEFAULTS: Mapping[str, Any] = {
    "variance": "biased",
    "eps_placement": "inside",
    "weight_offset": 0.0,
    "add_rounding": "dtype",
    "running_variance": "unbiased",
    "momentum_weights": "new",
}


@dataclass(frozen=True)
class NormSpec:
    """One norm: names, structure, and how to call it."""

    name: str
    title: str
    center: bool
    has_bias: bool
    summand: str | None  # "residual" (fused adds) or "sublayer_output" (DeepNorm)
    conventions: tuple[str, ...]
    forward: Callable[..., Any]
    default_eps: float | None

    @property
    def trailing(self) -> bool:
        return self.name not in ("group_norm", "instance_norm", "batch_norm")

    @property
    def fused(self) -> bool:
        return self.name.startswith("fused_add")

    def convention(self, declared: Mapping[str, Any]) -> dict[str, Any]:
        """The declared convention keywords this norm understands, defaults filled in."""
        return {k: declared.get(k, CONVENTION_DEFAULTS[k]) for k in self.conventions}


_BASIC = ("variance", "eps_placement", "weight_offset")
_ADD = (*_BASIC, "add_rounding")
_RUNNING = (*_BASIC, "running_variance", "momentum_weights")

SPECS: Mapping[str, NormSpec] = {
    s.name: s
    for s in (
        NormSpec(
            "layer_norm",
            "LayerNorm",
            True,
            True,
            None,
            _BASIC,
            references.layer_norm,
            1e-5,
        ),
        NormSpec(
            "rms_norm",
            "RMSNorm",
            False,
            False,
            None,
            _BASIC,
            references.rms_norm,
            None,
        ),
        NormSpec(
            "group_norm",
            "GroupNorm",
            True,
            True,
            None,
            _BASIC,
            references.group_norm,
            1e-5,
        ),
        NormSpec(
            "batch_norm",
            "BatchNorm",
            True,
            True,
            None,
            _RUNNING,
            references.batch_norm,
            1e-5,
        ),
        NormSpec(
            "instance_norm",
            "InstanceNorm",
            True,
            True,
            None,
            _BASIC,
            references.instance_norm,
            1e-5,
        ),
        NormSpec(
            "deep_norm",
            "DeepNorm",
            True,
            True,
            "sublayer_output",
            _ADD,
            references.deep_norm,
            1e-5,
        ),
        NormSpec(
            "fused_add_rms_norm",
            "Add + RMSNorm",
            False,
            False,
            "residual",
            _ADD,
            references.fused_add_rms_norm,
            None,
        ),
        NormSpec(
            "fused_add_layer_norm",
            "Add + LayerNorm",
            True,
            True,
            "residual",
            _ADD,
            references.fused_add_layer_norm,
            1e-5,
        ),
    )
}

NORM_NAMES = tuple(SPECS)


def spec(norm: str) -> NormSpec:
    try:
        return SPECS[norm]
    except KeyError:
        raise ValueError(f"unknown norm {norm!r}: expected one of {', '.join(SPECS)}") from None


def call_arguments(norm: str, t: Mapping[str, Any], p: Mapping[str, Any]) -> list[Any]:
    """Positional arguments, ``torch.nn.functional`` order, from tensors ``t`` and parameters ``p``.

    ``t`` holds ``input`` and, where the norm has them, ``weight``, ``bias``, ``residual`` /
    ``sublayer_output``, ``running_mean``, ``running_var`` (arrays or tensors, None when absent);
    ``p`` holds ``eps``, ``normalized_shape``, ``num_groups``, ``training``, ``momentum``,
    ``alpha``.
    """
    x, w, b, eps = t["input"], t.get("weight"), t.get("bias"), p["eps"]
    if norm == "layer_norm":
        return [x, p["normalized_shape"], w, b, eps]
    if norm == "rms_norm":
        return [x, p["normalized_shape"], w, eps]
    if norm == "group_norm":
        return [x, p["num_groups"], w, b, eps]
    if norm == "batch_norm":
        return [
            x,
            t["running_mean"],
            t["running_var"],
            w,
            b,
            p["training"],
            p["momentum"],
            eps,
        ]
    if norm == "instance_norm":
        return [x, None, None, w, b, True, p["momentum"], eps]
    if norm == "deep_norm":
        return [x, t["sublayer_output"], p["normalized_shape"], w, b, p["alpha"], eps]
    if norm == "fused_add_rms_norm":
        return [x, t["residual"], p["normalized_shape"], w, eps]
    if norm == "fused_add_layer_norm":
        return [x, t["residual"], p["normalized_shape"], w, b, eps]
    raise ValueError(f"unknown norm {norm!r}")


def call_keywords(norm: str, p: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword-only arguments of the adapter call (the fused adds' ``alpha``)."""
    return {"alpha": p["alpha"]} if spec(norm).fused else {}
