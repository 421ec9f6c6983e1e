"""The adapter contract: what an implementation under test looks like, validated once.

An adapter is any object — a module, a class instance — whose attributes are functions named and
shaped like ``torch.nn.functional``'s for the norms it implements; ``torch.nn.functional`` itself
is one. The engine calls them with these arguments, positionally in this order, with keywords only
where shown, on torch tensors (and sets ``requires_grad`` to exercise backward through autograd):

==========================  ==================================================================
norm                        call
==========================  ==================================================================
``layer_norm``              ``(input, normalized_shape, weight=None, bias=None, eps=1e-5)``
``rms_norm``                ``(input, normalized_shape, weight=None, eps=None)``
``group_norm``              ``(input, num_groups, weight=None, bias=None, eps=1e-5)``
``batch_norm``              ``(input, running_mean, running_var, weight=None, bias=None,
                            training=False, momentum=0.1, eps=1e-5)``; updates the running
                            statistics in place when training
``instance_norm``           ``(input, running_mean=None, running_var=None, weight=None,
                            bias=None, use_input_stats=True, momentum=0.1, eps=1e-5)``
``deep_norm``               ``(input, sublayer_output, normalized_shape, weight=None, bias=None,
                            alpha=1.0, eps=1e-5)`` = ``layer_norm(alpha * input +
                            sublayer_output)``
``fused_add_rms_norm``      ``(input, residual, normalized_shape, weight=None, eps=None, *,
                            alpha=1.0)`` -> ``(rms_norm(z), z)``, ``z = input + alpha *
                            residual``
``fused_add_layer_norm``    ``(input, residual, normalized_shape, weight=None, bias=None,
                            eps=1e-5, *, alpha=1.0)`` -> ``(layer_norm(z), z)``
==========================  ==================================================================

Optional functions ``<norm>_with_stats`` (for ``layer_norm``, ``rms_norm``, ``group_norm``) take
the same arguments as the norm and return ``(output, mean, rstd)`` (``mean`` None for RMSNorm), one
statistic per reduction group; where present, the engine checks the statistics too.

Optional attributes of the object declare what the engine may ask of it (all validated by
:func:`from_object`; an unknown ``normconf_*`` attribute is an error, so that a typo never goes
unnoticed):

``normconf_name``
    display name (str); default: the spec.
``normconf_devices``
    tuple of ``"cpu"``, ``"cuda"``; default ``("cpu", "cuda")``.
``normconf_dtypes``
    tuple of ``"float64"``, ``"float32"``, ``"float16"``, ``"bfloat16"``, or a dict norm ->
    such a tuple (norms left out get all four); default: all four for every norm.
``normconf_conventions``
    dict norm -> dict of the references' convention keywords (``variance``, ``eps_placement``,
    ``weight_offset``, ``add_rounding``, ``running_variance``, ``momentum_weights``), each only
    for the norms whose reference takes it; default ``{}``: PyTorch's conventions, which are the
    references' defaults.
``normconf_backward``
    bool, or dict norm -> bool (norms left out: True): whether gradients flow through autograd;
    default True.
``normconf_deterministic``
    bool, default True: the same inputs give bitwise the same outputs run after run.
``normconf_reduction``
    ``"tree"`` (default) or ``"sequential"``: how the kernel sums a reduction group, which sets
    the length term of the tolerance model (log2 n for a tree, n for a sequential sum).
``normconf_inplace``
    bool, default False: the fused add-norms (``fused_add_rms_norm``, ``fused_add_layer_norm``)
    update ``residual`` in place with the new residual ``z`` and return that same tensor as
    their second output, as serving kernels do. Without it, an output that shares memory with
    an argument, and an argument changed by the call, fail the contract check.
``normconf_out``
    bool (every norm of the adapter), or a tuple of norm names; default: none. Those norms'
    functions take a keyword ``out=``, write their results there and return them (the very
    tensors given). ``out=`` is one tensor of the output's shape, dtype and device, except for
    the fused add-norms: a tuple ``(output, residual_out)``, or the output alone where the
    adapter declares ``normconf_inplace`` (its ``residual`` is then the new residual's buffer).
    The engine calls them once more with ``out=`` buffers filled with NaN: an element left
    unwritten fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from references.conventions import (
    ADD_ROUNDINGS,
    EPS_PLACEMENTS,
    MOMENTUM_WEIGHTS,
    VARIANCES,
    finite_float,
)

NORMS = (
    "layer_norm",
    "rms_norm",
    "group_norm",
    "batch_norm",
    "instance_norm",
    "deep_norm",
    "fused_add_rms_norm",
    "fused_add_layer_norm",
)
DEVICES = ("cpu", "cuda")
DTYPES = ("float64", "float32", "float16", "bfloat16")
REDUCTIONS = ("tree", "sequential")

#: Allowed values of each convention keyword; ``None``: a finite float.
CONVENTION_VALUES: dict[str, tuple[str, ...] | None] = {
    "variance": VARIANCES,
    "eps_placement": EPS_PLACEMENTS,
    "weight_offset": None,
    "add_rounding": ADD_ROUNDINGS,
    "running_variance": VARIANCES,
    "momentum_weights": MOMENTUM_WEIGHTS,
}
_COMMON = ("variance", "eps_placement", "weight_offset")
_RUNNING = (*_COMMON, "running_variance", "momentum_weights")
_ADDED = (*_COMMON, "add_rounding")
#: The convention keywords each norm's reference takes.
CONVENTION_KEYWORDS: dict[str, tuple[str, ...]] = {
    "layer_norm": _COMMON,
    "rms_norm": _COMMON,
    "group_norm": _COMMON,
    "batch_norm": _RUNNING,
    "instance_norm": _RUNNING,
    "deep_norm": _ADDED,
    "fused_add_rms_norm": _ADDED,
    "fused_add_layer_norm": _ADDED,
}
METADATA = (
    "normconf_name",
    "normconf_devices",
    "normconf_dtypes",
    "normconf_conventions",
    "normconf_backward",
    "normconf_deterministic",
    "normconf_reduction",
    "normconf_inplace",
    "normconf_out",
)


def normalized_dims(normalized_shape: int | Sequence[int]) -> list[int]:
    """``normalized_shape`` as a list: the engine may pass a bare int, as the references accept."""
    if isinstance(normalized_shape, int):
        return [normalized_shape]
    return [int(size) for size in normalized_shape]


class AdapterError(Exception):
    """An adapter cannot be loaded or run here; the message is one line: what is wrong, how to
    fix it."""


@dataclass(frozen=True)
class Adapter:
    """A validated adapter: its norm functions and what it declares about them.

    ``dtypes``, ``conventions`` and ``backward`` have one entry per implemented norm; ``out``
    names the norms whose functions write into a provided ``out=``, in :data:`NORMS` order.
    """

    name: str
    spec: str
    obj: object
    functions: dict[str, Callable[..., Any]]
    devices: tuple[str, ...]
    dtypes: dict[str, tuple[str, ...]]
    conventions: dict[str, dict[str, Any]]
    backward: dict[str, bool]
    deterministic: bool
    reduction: str
    statistics: dict[str, Callable[..., Any]] = field(default_factory=dict)
    inplace: bool = False
    out: tuple[str, ...] = ()

    def norms(self) -> tuple[str, ...]:
        """The implemented norms, in :data:`NORMS` order."""
        return tuple(norm for norm in NORMS if norm in self.functions)

    def supports(self, norm: str, dtype: str, device: str) -> bool:
        """Whether the adapter declares ``norm`` in ``dtype`` on ``device``."""
        return norm in self.functions and dtype in self.dtypes[norm] and device in self.devices

    def convention(self, norm: str) -> dict[str, Any]:
        """The reference keywords of ``norm``'s convention (a copy; ``{}``: PyTorch's)."""
        if norm not in self.functions:
            raise AdapterError(
                f"adapter {self.name!r} has no {norm}: it implements {', '.join(self.norms())}"
            )
        return dict(self.conventions[norm])

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for reports."""
        norms = self.norms()
        return {
            "name": self.name,
            "spec": self.spec,
            "norms": list(norms),
            "devices": list(self.devices),
            "dtypes": {norm: list(self.dtypes[norm]) for norm in norms},
            "conventions": {norm: dict(self.conventions[norm]) for norm in norms},
            "backward": {norm: self.backward[norm] for norm in norms},
            "deterministic": self.deterministic,
            "reduction": self.reduction,
            "inplace": self.inplace,
            "out": list(self.out),
        }


def from_object(obj: object, spec: str, name: str | None = None) -> Adapter:
    """Validate ``obj`` as an adapter; ``spec`` is how it was named, ``name`` overrides its
    display name. Raises :class:`AdapterError` naming the first attribute that is wrong."""
    _reject_unknown_metadata(obj, spec)
    functions = _functions(obj, spec)
    norms = tuple(functions)
    return Adapter(
        name=name if name is not None else _text(obj, spec, "normconf_name", spec),
        spec=spec,
        obj=obj,
        functions=functions,
        devices=_choices(obj, spec, "normconf_devices", DEVICES, DEVICES),
        dtypes=_dtypes(obj, spec, norms),
        conventions=_conventions(obj, spec, norms),
        backward=_backward(obj, spec, norms),
        deterministic=_flag(obj, spec, "normconf_deterministic", True),
        inplace=_flag(obj, spec, "normconf_inplace", False),
        out=_out(obj, spec, norms),
        reduction=_one_of(obj, spec, "normconf_reduction", REDUCTIONS, "tree"),
        statistics=_statistics(obj, spec, norms),
    )


STATISTICS_NORMS = ("layer_norm", "rms_norm", "group_norm")


def _statistics(obj: object, spec: str, norms: tuple[str, ...]) -> dict[str, Callable[..., Any]]:
    found: dict[str, Callable[..., Any]] = {}
    for norm in STATISTICS_NORMS:
        function = getattr(obj, f"{norm}_with_stats", None)
        if function is None:
            continue
        if norm not in norms or not callable(function):
            raise _fail(spec, f"{norm}_with_stats", f"needs a callable and the norm {norm}")
        found[norm] = function
    return found


def _fail(spec: str, attribute: str, problem: str) -> AdapterError:
    return AdapterError(f"adapter {spec!r}: {attribute} {problem}")


def _reject_unknown_metadata(obj: object, spec: str) -> None:
    for attribute in dir(obj):
        if attribute.startswith("normconf_") and attribute not in METADATA:
            raise _fail(spec, attribute, f"is not a known attribute: use {', '.join(METADATA)}")


def _functions(obj: object, spec: str) -> dict[str, Callable[..., Any]]:
    functions: dict[str, Callable[..., Any]] = {}
    for norm in NORMS:
        function = getattr(obj, norm, None)
        if function is None:
            continue
        if not callable(function):
            raise _fail(spec, norm, f"is a {type(function).__name__}, not a function: drop it")
        functions[norm] = function
    if not functions:
        raise AdapterError(
            f"adapter {spec!r} has no norm functions: expected one of {', '.join(NORMS)}"
        )
    return functions


def _text(obj: object, spec: str, attribute: str, default: str) -> str:
    value = getattr(obj, attribute, default)
    if not isinstance(value, str) or not value.strip():
        raise _fail(spec, attribute, f"must be a non-empty str, got {value!r}")
    return value


def _flag(obj: object, spec: str, attribute: str, default: bool) -> bool:
    value = getattr(obj, attribute, default)
    if not isinstance(value, bool):
        raise _fail(spec, attribute, f"must be True or False, got {value!r}")
    return value


def _one_of(obj: object, spec: str, attribute: str, allowed: tuple[str, ...], default: str) -> str:
    value = getattr(obj, attribute, default)
    if value not in allowed:
        raise _fail(spec, attribute, f"must be one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def _choices(
    obj: object, spec: str, attribute: str, allowed: tuple[str, ...], default: tuple[str, ...]
) -> tuple[str, ...]:
    chosen = _checked_tuple(spec, attribute, getattr(obj, attribute, default), allowed)
    if not chosen:
        raise _fail(spec, attribute, f"is empty: name at least one of {', '.join(allowed)}")
    return chosen


def _checked_tuple(
    spec: str, attribute: str, value: object, allowed: tuple[str, ...]
) -> tuple[str, ...]:
    if not isinstance(value, tuple | list) or any(item not in allowed for item in value):
        raise _fail(
            spec, attribute, f"must be a tuple of {', '.join(map(repr, allowed))}, got {value!r}"
        )
    return tuple(dict.fromkeys(str(item) for item in value))


def _implemented(named: Iterable[str], spec: str, attribute: str, norms: tuple[str, ...]) -> None:
    """Every norm a declaration names is one the adapter implements."""
    for norm in named:
        if norm not in norms:
            raise _fail(
                spec,
                attribute,
                f"names {norm!r}, which the adapter does not implement ({', '.join(norms)})",
            )


def _per_norm(
    value: Mapping[str, Any], spec: str, attribute: str, norms: tuple[str, ...]
) -> dict[str, Any]:
    """A dict-valued declaration, checked to name only implemented norms."""
    _implemented(value, spec, attribute, norms)
    return dict(value)


def _out(obj: object, spec: str, norms: tuple[str, ...]) -> tuple[str, ...]:
    """The norms declared to write into a provided ``out=``, in :data:`NORMS` order."""
    value = getattr(obj, "normconf_out", False)
    if isinstance(value, bool):
        return norms if value else ()
    if not isinstance(value, tuple | list) or not all(isinstance(n, str) for n in value):
        raise _fail(spec, "normconf_out", f"must be a bool or a tuple of norm names, got {value!r}")
    _implemented(value, spec, "normconf_out", norms)
    return tuple(norm for norm in norms if norm in value)


def _dtypes(obj: object, spec: str, norms: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    value = getattr(obj, "normconf_dtypes", DTYPES)
    if not isinstance(value, Mapping):
        every = _checked_tuple(spec, "normconf_dtypes", value, DTYPES)
        return dict.fromkeys(norms, every)
    declared = _per_norm(value, spec, "normconf_dtypes", norms)
    return {
        norm: _checked_tuple(spec, f"normconf_dtypes[{norm!r}]", declared.get(norm, DTYPES), DTYPES)
        for norm in norms
    }


def _backward(obj: object, spec: str, norms: tuple[str, ...]) -> dict[str, bool]:
    value = getattr(obj, "normconf_backward", True)
    if isinstance(value, bool):
        return dict.fromkeys(norms, value)
    if not isinstance(value, Mapping):
        raise _fail(
            spec, "normconf_backward", f"must be a bool or a dict norm -> bool, got {value!r}"
        )
    declared = _per_norm(value, spec, "normconf_backward", norms)
    result = {}
    for norm in norms:
        flag = declared.get(norm, True)
        if not isinstance(flag, bool):
            raise _fail(spec, f"normconf_backward[{norm!r}]", f"must be a bool, got {flag!r}")
        result[norm] = flag
    return result


def _conventions(obj: object, spec: str, norms: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    value = getattr(obj, "normconf_conventions", {})
    if not isinstance(value, Mapping):
        raise _fail(spec, "normconf_conventions", f"must be a dict norm -> dict, got {value!r}")
    declared = _per_norm(value, spec, "normconf_conventions", norms)
    return {norm: _convention(spec, norm, declared.get(norm, {})) for norm in norms}


def _convention(spec: str, norm: str, keywords: object) -> dict[str, Any]:
    attribute = f"normconf_conventions[{norm!r}]"
    if not isinstance(keywords, Mapping):
        raise _fail(spec, attribute, f"must be a dict of convention keywords, got {keywords!r}")
    checked: dict[str, Any] = {}
    for keyword, setting in keywords.items():
        if keyword not in CONVENTION_KEYWORDS[norm]:
            raise _fail(
                spec,
                attribute,
                f"has {keyword!r}, which {norm} does not take: use "
                f"{', '.join(CONVENTION_KEYWORDS[norm])}",
            )
        allowed = CONVENTION_VALUES[keyword]
        if allowed is None:
            try:
                checked[keyword] = finite_float(keyword, setting)
            except ValueError as error:
                raise _fail(spec, attribute, str(error)) from None
        elif setting not in allowed:
            raise _fail(
                spec,
                attribute,
                f"{keyword}={setting!r} is not one of {', '.join(map(repr, allowed))}",
            )
        else:
            checked[keyword] = setting
    return checked
