"""Turn ``--adapter SPEC`` into a validated :class:`~impls.adapter.Adapter`, and pick its device.

SPEC is, in the order tried:

1. a built-in name (:data:`impls.registry.BUILTINS`: ``torch``, ``torch-compile``, ...);
2. a name an installed package registers under the entry-point group ``normconf.adapters``;
3. ``path/to/file.py[:attr]`` — any spec that ends in ``.py`` or contains a path separator;
4. ``pkg.module[:attr]``.

``attr`` may be dotted (``module:Outer.adapter``); when it names a class, the class is
instantiated with no arguments. Every failure is an :class:`~impls.adapter.AdapterError` whose
message is one line.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

from impls.adapter import Adapter, AdapterError, from_object
from impls.registry import BUILTINS, available, entry_points

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
DEVICE_REQUESTS = ("auto", "cpu", "cuda")


def load_adapter(spec: str) -> Adapter:
    """The adapter SPEC names, imported, instantiated where a class, and validated."""
    spec = spec.strip()
    if not spec:
        raise AdapterError(f"empty adapter spec: name one of {_names()}, a module or a file")
    obj = _find(spec)
    try:
        return from_object(obj, spec)
    except AdapterError:
        raise
    except Exception as error:  # a lazily computed attribute that fails while being read
        raise AdapterError(f"validating adapter {spec!r} raised {_one_line(error)}") from None


def _find(spec: str) -> object:
    if spec in BUILTINS:
        return _from_module_spec(BUILTINS[spec].module, spec)
    registered = entry_points()
    if spec in registered:
        return _from_module_spec(registered[spec], spec)
    target, attr = _split_attr(spec)
    if target.endswith(".py") or "/" in target or os.sep in target:
        return _resolve(_import_file(Path(target)), attr, target)
    if attr is None and "." not in target:
        return _import_bare_name(target)
    return _from_module_spec(spec, spec)


def resolve_device(adapter: Adapter, requested: str) -> str:
    """``"cpu"`` or ``"cuda"``: ``"auto"`` is CUDA where torch sees a GPU and the adapter lists
    it, the CPU otherwise; a device the adapter does not list, or CUDA without a GPU, is an
    :class:`AdapterError`."""
    if requested not in DEVICE_REQUESTS:
        raise AdapterError(f"unknown device {requested!r}: use one of {', '.join(DEVICE_REQUESTS)}")
    import torch  # here, not at the top: naming a device should not cost a torch import early

    has_gpu = torch.cuda.is_available()
    device = requested
    if requested == "auto":
        device = "cuda" if has_gpu and "cuda" in adapter.devices else "cpu"
    if device not in adapter.devices and adapter.devices == ("cuda",) and not has_gpu:
        raise AdapterError(
            f"adapter {adapter.name!r} runs only on CUDA and torch sees no GPU here: run it on "
            "a machine with a CUDA GPU and a CUDA build of torch"
        )
    if device not in adapter.devices:
        raise AdapterError(
            f"adapter {adapter.name!r} does not run on {device}: it declares "
            f"{', '.join(adapter.devices)}; pass --device {adapter.devices[0]}"
        )
    if device == "cuda" and not has_gpu:
        raise AdapterError(
            "CUDA requested but torch sees no GPU: run on a machine with a CUDA GPU and a CUDA "
            "build of torch, or pass --device cpu"
        )
    return device


def _names() -> str:
    return ", ".join(available())


def _one_line(error: BaseException) -> str:
    """``Type: first line of the message`` (just ``Type`` for an empty message)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _split_attr(spec: str) -> tuple[str, str | None]:
    """``target[:attr]``; a colon whose right side is not a dotted name (``C:\\x.py``) is part of
    the target."""
    target, colon, attr = spec.rpartition(":")
    if colon and target and _DOTTED.fullmatch(attr):
        return target, attr
    return spec, None


def _from_module_spec(spec: str, shown: str) -> object:
    """``pkg.module[:attr]`` imported and resolved; ``shown`` is the spec the user gave."""
    module_name, attr = _split_attr(spec)
    if not _DOTTED.fullmatch(module_name):
        raise AdapterError(
            f"adapter spec {shown!r} is neither a name ({_names()}), a module path "
            "pkg.module[:attr] nor a file path/to/file.py[:attr]"
        )
    return _resolve(_import_module(module_name), attr, module_name)


def _import_bare_name(name: str) -> object:
    """A spec without dots or colon: a module if one is importable, else a mistyped name."""
    if not _DOTTED.fullmatch(name) or importlib.util.find_spec(name) is None:
        close = difflib.get_close_matches(name, list(available()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise AdapterError(
            f"unknown adapter {name!r}{hint}: not a built-in or installed adapter ({_names()}) "
            "nor an importable module"
        )
    return _import_module(name)


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except AdapterError:
        raise
    except ModuleNotFoundError as error:
        if error.name is not None and (name == error.name or name.startswith(error.name + ".")):
            raise AdapterError(
                f"module {name!r} not found: check the spelling, install its package, or run "
                "from the directory that contains it"
            ) from None
        raise AdapterError(f"importing {name} raised {_one_line(error)}") from None
    except Exception as error:
        raise AdapterError(f"importing {name} raised {_one_line(error)}") from None


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise AdapterError(f"adapter file {str(path)!r} not found")
    if path.suffix != ".py":
        raise AdapterError(f"adapter file {str(path)!r} is not a .py file")
    resolved = path.resolve()
    # A private, path-derived module name: two files called adapter.py never collide.
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    name = f"normconf_adapter_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise AdapterError(f"adapter file {str(path)!r} cannot be imported as a module")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before running, as the import system does: dataclasses and pickling look it up.
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except AdapterError:
        del sys.modules[name]
        raise
    except BaseException as error:
        del sys.modules[name]
        if not isinstance(error, Exception):
            raise
        raise AdapterError(f"importing {path} raised {_one_line(error)}") from None
    return module


def _resolve(module: ModuleType, attr: str | None, where: str) -> object:
    """``module.attr`` (dotted), instantiated when it is a class; the module without ``attr``."""
    obj: object = module
    if attr is None:
        return obj
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AdapterError:
            raise
        except AttributeError:
            raise AdapterError(
                f"{where} has no attribute {attr!r}: check the name after the ':'"
            ) from None
        except Exception as error:
            raise AdapterError(f"reading {where}:{attr} raised {_one_line(error)}") from None
    if isinstance(obj, type):
        try:
            return obj()
        except AdapterError:
            raise
        except Exception as error:
            raise AdapterError(
                f"instantiating {where}:{attr} with no arguments raised {_one_line(error)}"
            ) from None
    return obj
