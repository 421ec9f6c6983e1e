"""A float64 evaluation of every norm in torch, on any device, differentiable: the yardstick that
re-verifies the outputs of timed calls.

The speed battery's shapes are far larger than the accuracy battery's, and the correctly
rounded references (:mod:`references`) take seconds per million elements for a backward pass.
After timing, what matters is whether the kernel still computed the norm (a kernel that is fast
because it skips work must fail), and for that a float64 evaluation is exact enough: its error,
a few units of 2⁻⁵³ times the row's κ, is far below the tolerance model's bound for outputs of
16- and 32-bit dtypes, which is what the speed battery times (float64 is not timed). The
comparison itself goes through the same tolerance model as every accuracy check.

Each norm follows the references' conventions (:data:`conformance.specs.CONVENTION_DEFAULTS`):
``variance`` (divide the squared deviations by n or n - 1), ``eps_placement`` (``inside``:
``1/sqrt(v + eps)``; ``outside``: ``1/(sqrt(v) + eps)``), ``weight_offset`` (scale by
``offset + w``) and ``add_rounding`` (``dtype``: the sum of the add-norms is rounded into the
input dtype before it is normalised; ``exact``: it is not). BatchNorm in training normalises
with the batch statistics, in evaluation with the running ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conformance.cases import Case
from conformance.inputs import effective_eps
from conformance.specs import spec


def evaluate(
    case: Case, tensors: Mapping[str, Any], convention: Mapping[str, Any]
) -> dict[str, Any]:
    """``{"output": y}`` (and ``"residual_out": z`` for the add-norms) of ``case`` in float64.

    ``tensors`` holds float64 tensors named as the adapter's arguments (``input``, ``weight``,
    ``bias``, ``residual`` / ``sublayer_output``, ``running_mean``, ``running_var``), None or
    missing where absent; gradients flow to every tensor that requires them.
    """
    norm, s = case.norm, spec(case.norm)
    x = tensors["input"]
    result: dict[str, Any] = {}
    if s.summand is not None:
        other = tensors[s.summand]
        alpha = case.alpha
        z = alpha * x + other if norm == "deep_norm" else x + alpha * other
        if convention.get("add_rounding", "dtype") == "dtype":
            z = _rounded(z, case.dtype)
        if s.fused:
            result["residual_out"] = z
        x = z
    rows, restore, weight, bias = _arrange(case, x, tensors)
    mean, inv = _statistics(case, rows, tensors, convention)
    normalised = (rows - mean) * inv if s.center else rows * inv
    offset = float(convention.get("weight_offset", 0.0))
    if weight is not None:
        normalised = normalised * (offset + weight)
    if bias is not None:
        normalised = normalised + bias
    result["output"] = restore(normalised)
    return result


def _rounded(z: Any, dtype: str) -> Any:
    """``z`` rounded into ``dtype``, the rounding seen by autograd as the identity."""
    import torch

    target = getattr(torch, dtype)
    return z + (z.detach().to(target).to(torch.float64) - z.detach())


def _arrange(case: Case, x: Any, tensors: Mapping[str, Any]) -> tuple[Any, Any, Any, Any]:
    """``x`` as a ``(groups, n)`` matrix, the inverse map, and weight and bias spread to it."""
    norm, weight, bias = case.norm, tensors.get("weight"), tensors.get("bias")
    shape = tuple(x.shape)
    if spec(norm).trailing:
        n = case.grouping.n
        w = None if weight is None else weight.reshape(1, n)
        b = None if bias is None else bias.reshape(1, n)
        return x.reshape(-1, n), lambda r: r.reshape(shape), w, b
    batch, channels = shape[0], shape[1]
    planes = x.reshape(batch, channels, -1)
    spatial = planes.shape[2]
    w = None if weight is None else weight.reshape(channels, 1)
    b = None if bias is None else bias.reshape(channels, 1)
    if norm == "batch_norm":
        rows = planes.transpose(0, 1).reshape(channels, -1)

        def restore_batch(r: Any) -> Any:
            return r.reshape(channels, batch, spatial).transpose(0, 1).reshape(shape)

        return rows, restore_batch, w, b
    groups = channels if norm == "instance_norm" else case.num_groups
    per = channels // groups
    rows = planes.reshape(batch * groups, per * spatial)
    # per-channel parameters, laid out as each group's row: (groups, per) -> (groups, per·spatial)
    if w is not None:
        w = w.reshape(1, groups, per, 1).expand(batch, groups, per, spatial)
        w = w.reshape(batch * groups, per * spatial)
    if b is not None:
        b = b.reshape(1, groups, per, 1).expand(batch, groups, per, spatial)
        b = b.reshape(batch * groups, per * spatial)
    return rows, lambda r: r.reshape(shape), w, b


def _statistics(
    case: Case, rows: Any, tensors: Mapping[str, Any], convention: Mapping[str, Any]
) -> tuple[Any, Any]:
    """Per row: the mean (0 for RMSNorm) and the inverse scale."""
    import torch

    s = spec(case.norm)
    eps = effective_eps(case)  # rms_norm's None: the opmath type's machine epsilon
    outside = convention.get("eps_placement", "inside") == "outside"
    if case.norm == "batch_norm" and not case.training:
        mean = tensors["running_mean"].reshape(-1, 1)
        var = tensors["running_var"].reshape(-1, 1)
    else:
        n = rows.shape[1]
        count = n - 1 if convention.get("variance", "biased") == "unbiased" else n
        mean = rows.mean(dim=1, keepdim=True) if s.center else torch.zeros_like(rows[:, :1])
        var = (rows - mean).square().sum(dim=1, keepdim=True) / count
    if outside:
        return mean, 1.0 / (var.sqrt() + eps)
    return mean, (var + eps).rsqrt()
