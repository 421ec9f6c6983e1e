"""Adapters: the implementations under test, one subpackage per backend.

An adapter is any object whose attributes are functions named and shaped like
``torch.nn.functional``'s for the norms it implements (``layer_norm``, ``rms_norm``, ...), with
optional attributes that declare its display name, devices, dtypes and conventions. Backends live
here as subpackages (``torch``, ``torch_compile``, ``onnxruntime``, ``triton``, ``cuda``, ...),
next to a registry of built-in names and the loader that turns ``--adapter SPEC`` into an adapter.
Importing this package stays cheap: heavy backends are imported lazily, when used.

The adapters, the registry and the loader arrive with the adapter work.
"""
