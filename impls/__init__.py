"""Adapters: the implementations under test, one subpackage per backend.

An adapter is any object whose attributes are functions named and shaped like
``torch.nn.functional``'s for the norms it implements (``layer_norm``, ``rms_norm``, ...), with
optional ``normconf_*`` attributes that declare its display name, devices, dtypes, conventions,
backward support, determinism and reduction order; :mod:`impls.adapter` states the contract.
Built-in backends live here as subpackages (``torch``, ``torch_compile``, ``onnxruntime``,
``handwritten``), named in :mod:`impls.registry`; :func:`load_adapter` turns ``--adapter SPEC``
into a validated :class:`Adapter` and :func:`resolve_device` picks the device to run it on.

Importing this package stays cheap: no backend (torch, torch._dynamo, onnxruntime, triton) is
imported until an adapter that needs it is loaded.
"""

from impls.adapter import NORMS, Adapter, AdapterError, from_object
from impls.loader import load_adapter, resolve_device
from impls.registry import BUILTINS, ENTRY_POINT_GROUP, available

__all__ = [
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "NORMS",
    "Adapter",
    "AdapterError",
    "available",
    "from_object",
    "load_adapter",
    "resolve_device",
]
