"""The adapter loader and the adapter contract: specs, errors, metadata, devices, lazy imports.

Every failure must be an :class:`AdapterError` with a one-line message that names what is wrong;
the tests check the words that matter, not whole sentences.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import impls
from impls import NORMS, AdapterError, from_object, load_adapter, resolve_device
from impls.adapter import CONVENTION_KEYWORDS
from impls.registry import BUILTINS, ENTRY_POINT_GROUP

ROOT = Path(__file__).resolve().parent.parent

ADAPTER_SOURCE = """
import torch.nn.functional as F

layer_norm = F.layer_norm


class Kernels:
    normconf_name = "kernels class"
    normconf_dtypes = ("float32",)

    def rms_norm(self, input, normalized_shape, weight=None, eps=None):
        return F.rms_norm(input, normalized_shape, weight, eps)


class Holder:
    inner = None


Holder.inner = Kernels()


class NeedsArgument:
    def __init__(self, required):
        self.layer_norm = F.layer_norm


empty = object()
"""


def expect_error(spec: str, *fragments: str) -> str:
    """Load ``spec``, expect an AdapterError with a one-line message containing ``fragments``."""
    __tracebackhide__ = True
    with pytest.raises(AdapterError) as info:
        load_adapter(spec)
    message = str(info.value)
    assert "\n" not in message, f"message is not one line: {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


@pytest.fixture
def adapter_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_adapter.py"
    path.write_text(ADAPTER_SOURCE)
    return path


@pytest.fixture
def adapter_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable package ``normconf_test_pkg`` with module ``kernels``; returns its name."""
    package = tmp_path / "normconf_test_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "kernels.py").write_text(ADAPTER_SOURCE)
    (package / "broken.py").write_text("raise ValueError('bad constant\\nsecond line')\n")
    (package / "needs_missing.py").write_text("import normconf_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("normconf_test_pkg")]:
        monkeypatch.delitem(sys.modules, name)
    return "normconf_test_pkg"


# -- specs that load ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "norms"),
    [
        ("torch", NORMS),
        ("handwritten", ("layer_norm",)),
        ("torch.nn.functional", NORMS[:5]),
    ],
)
def test_builtin_and_module_specs_load(spec: str, norms: tuple[str, ...]) -> None:
    adapter = load_adapter(spec)
    assert adapter.spec == spec
    assert adapter.norms() == norms


def test_registry_names_every_builtin_subpackage() -> None:
    assert set(BUILTINS) == {
        "torch",
        "torch-compile",
        "onnxruntime",
        "handwritten",
        "triton",
        "triton-gemma",
        "cuda",
    }
    for builtin in BUILTINS.values():
        assert builtin.module.startswith("impls.")
        path = ROOT / builtin.module.replace(".", "/")
        assert (path / "__init__.py").is_file() or path.with_suffix(".py").is_file()
    assert list(impls.available())[: len(BUILTINS)] == list(BUILTINS)


def test_file_spec_without_attr_is_the_module(adapter_file: Path) -> None:
    adapter = load_adapter(str(adapter_file))
    assert adapter.norms() == ("layer_norm",)
    assert adapter.name == str(adapter_file)


def test_file_spec_with_class_attr_is_instantiated(adapter_file: Path) -> None:
    adapter = load_adapter(f"{adapter_file}:Kernels")
    assert adapter.norms() == ("rms_norm",)
    assert adapter.name == "kernels class"
    assert adapter.dtypes == {"rms_norm": ("float32",)}
    x = torch.randn(3, 8)
    torch.testing.assert_close(adapter.functions["rms_norm"](x, (8,)), torch.rms_norm(x, (8,)))


def test_file_spec_with_dotted_attr(adapter_file: Path) -> None:
    assert load_adapter(f"{adapter_file}:Holder.inner").norms() == ("rms_norm",)


def test_module_spec_with_attr(adapter_package: str) -> None:
    adapter = load_adapter(f"{adapter_package}.kernels:Kernels")
    assert adapter.norms() == ("rms_norm",)
    assert load_adapter(f"{adapter_package}.kernels").norms() == ("layer_norm",)


def test_entry_point_is_discovered(adapter_package: str, monkeypatch: pytest.MonkeyPatch) -> None:
    point = importlib.metadata.EntryPoint(
        name="plugged", value=f"{adapter_package}.kernels:Kernels", group=ENTRY_POINT_GROUP
    )
    seen: list[Any] = []

    def entry_points(**selection: Any) -> list[importlib.metadata.EntryPoint]:
        seen.append(selection)
        return [point] if selection.get("group") == ENTRY_POINT_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert load_adapter("plugged").norms() == ("rms_norm",)
    assert seen == [{"group": ENTRY_POINT_GROUP}]
    assert "plugged" in impls.available()
    # A built-in keeps its name even when a plugin claims it.
    claimed = importlib.metadata.EntryPoint("torch", point.value, ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: [claimed])
    assert load_adapter("torch").norms() == NORMS


# -- specs that fail ---------------------------------------------------------------------------


def test_unknown_name_lists_the_builtins() -> None:
    expect_error("no_such_adapter", "unknown adapter 'no_such_adapter'", *BUILTINS)


def test_mistyped_builtin_gets_a_suggestion() -> None:
    expect_error("torch-compil", "unknown adapter 'torch-compil'", "did you mean 'torch-compile'?")


def test_empty_spec() -> None:
    expect_error("  ", "empty adapter spec", "torch-compile")


def test_module_not_found() -> None:
    expect_error("normconf_nowhere.kernels", "module 'normconf_nowhere.kernels' not found")
    expect_error("normconf_nowhere.kernels:adapter", "module 'normconf_nowhere.kernels' not found")


def test_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "absent.py"
    expect_error(f"{missing}:adapter", "not found", str(missing))


def test_not_a_python_file(tmp_path: Path) -> None:
    path = tmp_path / "adapter.txt"
    path.write_text("layer_norm = None\n")
    expect_error(f"{path}", "not a .py file")


def test_missing_attribute(adapter_file: Path, adapter_package: str) -> None:
    expect_error(f"{adapter_file}:nothing_here", "has no attribute 'nothing_here'")
    expect_error(f"{adapter_package}.kernels:Holder.nope", "has no attribute 'Holder.nope'")


def test_class_that_needs_arguments(adapter_file: Path) -> None:
    expect_error(f"{adapter_file}:NeedsArgument", "instantiating", "TypeError")


def test_import_that_raises(tmp_path: Path, adapter_package: str) -> None:
    path = tmp_path / "raises.py"
    path.write_text("raise RuntimeError('no kernels built\\nsee the log')\n")
    expect_error(str(path), f"importing {path} raised RuntimeError: no kernels built")
    expect_error(
        f"{adapter_package}.broken",
        f"importing {adapter_package}.broken raised ValueError: bad constant",
    )


def test_missing_dependency_is_an_import_error_not_a_missing_module(adapter_package: str) -> None:
    expect_error(
        f"{adapter_package}.needs_missing",
        "raised ModuleNotFoundError",
        "normconf_no_such_dependency",
    )


def test_syntax_error_in_file(tmp_path: Path) -> None:
    path = tmp_path / "bad_syntax.py"
    path.write_text("def layer_norm(:\n")
    expect_error(str(path), "raised SyntaxError")


def test_no_norm_functions(adapter_file: Path) -> None:
    expected = f"has no norm functions: expected one of {', '.join(NORMS)}"
    expect_error(f"{adapter_file}:empty", expected)
    expect_error("json", expected)


def test_missing_onnxruntime_is_reported_with_the_install_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # None: "import onnxruntime" fails
    monkeypatch.delitem(sys.modules, "impls.onnxruntime", raising=False)
    expect_error("onnxruntime", "onnxruntime is not installed: pip install onnxruntime onnx")


# -- metadata validation -----------------------------------------------------------------------


def _layer_norm(*args: Any) -> Any:
    return args


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ({"normconf_name": ""}, "normconf_name must be a non-empty str"),
        ({"normconf_devices": "cpu"}, "normconf_devices must be a tuple"),
        ({"normconf_devices": ("tpu",)}, "normconf_devices must be a tuple"),
        ({"normconf_devices": ()}, "normconf_devices is empty"),
        ({"normconf_dtypes": ("float8",)}, "normconf_dtypes must be a tuple"),
        ({"normconf_dtypes": {"group_norm": ("float32",)}}, "names 'group_norm'"),
        ({"normconf_dtypes": {"layer_norm": "float32"}}, "normconf_dtypes['layer_norm']"),
        ({"normconf_conventions": ["biased"]}, "normconf_conventions must be a dict"),
        ({"normconf_conventions": {"rms_norm": {}}}, "names 'rms_norm'"),
        ({"normconf_conventions": {"layer_norm": "outside"}}, "must be a dict of convention"),
        (
            {"normconf_conventions": {"layer_norm": {"variance": "sample"}}},
            "variance='sample' is not one of 'biased', 'unbiased'",
        ),
        (
            {"normconf_conventions": {"layer_norm": {"add_rounding": "dtype"}}},
            "'add_rounding', which layer_norm does not take",
        ),
        (
            {"normconf_conventions": {"layer_norm": {"weight_offset": float("inf")}}},
            "weight_offset must be finite",
        ),
        ({"normconf_backward": "yes"}, "normconf_backward must be a bool or a dict"),
        ({"normconf_backward": {"layer_norm": 1}}, "normconf_backward['layer_norm']"),
        ({"normconf_deterministic": 1}, "normconf_deterministic must be True or False"),
        ({"normconf_reduction": "random"}, "normconf_reduction must be one of tree, sequential"),
        ({"normconf_inplace": "no"}, "normconf_inplace must be True or False"),
        ({"normconf_dtype": ("float32",)}, "normconf_dtype is not a known attribute"),
        ({"rms_norm": 3}, "rms_norm is a int, not a function"),
    ],
)
def test_bad_metadata_is_named(metadata: dict[str, Any], fragment: str) -> None:
    candidate = SimpleNamespace(layer_norm=_layer_norm, **metadata)
    with pytest.raises(AdapterError) as info:
        from_object(candidate, "candidate")
    message = str(info.value)
    assert "\n" not in message
    assert fragment in message
    assert message.startswith("adapter 'candidate'")


def test_metadata_is_normalised_per_norm() -> None:
    candidate = SimpleNamespace(
        layer_norm=_layer_norm,
        batch_norm=_layer_norm,
        normconf_name="two norms",
        normconf_devices=["cuda"],
        normconf_dtypes={"batch_norm": ("float32", "float16")},
        normconf_conventions={"batch_norm": {"momentum_weights": "running", "weight_offset": 1}},
        normconf_backward={"batch_norm": False},
        normconf_reduction="sequential",
    )
    adapter = from_object(candidate, "spec.of:candidate")
    assert adapter.norms() == ("layer_norm", "batch_norm")
    assert adapter.devices == ("cuda",)
    assert adapter.dtypes == {
        "layer_norm": ("float64", "float32", "float16", "bfloat16"),
        "batch_norm": ("float32", "float16"),
    }
    assert adapter.convention("batch_norm") == {"momentum_weights": "running", "weight_offset": 1.0}
    assert adapter.convention("layer_norm") == {}
    assert adapter.backward == {"layer_norm": True, "batch_norm": False}
    assert adapter.supports("batch_norm", "float16", "cuda")
    assert not adapter.supports("batch_norm", "bfloat16", "cuda")
    assert not adapter.supports("layer_norm", "float32", "cpu")
    assert not adapter.supports("rms_norm", "float32", "cuda")
    with pytest.raises(AdapterError, match="has no rms_norm"):
        adapter.convention("rms_norm")
    described = json.loads(json.dumps(adapter.describe()))
    assert described["name"] == "two norms"
    assert described["norms"] == ["layer_norm", "batch_norm"]
    assert described["reduction"] == "sequential"
    assert described["conventions"]["batch_norm"]["momentum_weights"] == "running"


def test_convention_keywords_are_the_references_keywords() -> None:
    import inspect

    import references

    shared = {"variance", "eps_placement", "weight_offset", "add_rounding"}
    shared |= {"running_variance", "momentum_weights"}
    for norm, keywords in CONVENTION_KEYWORDS.items():
        parameters = inspect.signature(getattr(references, norm)).parameters
        taken = {name for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY} & shared
        assert set(keywords) == taken, norm


# -- devices -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("has_gpu", "devices", "requested", "expected"),
    [
        (False, ("cpu", "cuda"), "auto", "cpu"),
        (True, ("cpu", "cuda"), "auto", "cuda"),
        (True, ("cpu",), "auto", "cpu"),
        (True, ("cpu", "cuda"), "cpu", "cpu"),
        (True, ("cuda",), "cuda", "cuda"),
    ],
)
def test_resolve_device(
    monkeypatch: pytest.MonkeyPatch,
    has_gpu: bool,
    devices: tuple[str, ...],
    requested: str,
    expected: str,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_gpu)
    adapter = from_object(SimpleNamespace(layer_norm=_layer_norm, normconf_devices=devices), "a")
    assert resolve_device(adapter, requested) == expected


@pytest.mark.parametrize(
    ("has_gpu", "devices", "requested", "fragment"),
    [
        (False, ("cpu", "cuda"), "cuda", "CUDA requested but torch sees no GPU"),
        (False, ("cuda",), "auto", "runs only on CUDA and torch sees no GPU here"),
        (False, ("cuda",), "cpu", "runs only on CUDA and torch sees no GPU here"),
        (True, ("cuda",), "cpu", "does not run on cpu: it declares cuda"),
        (True, ("cpu",), "cuda", "does not run on cuda: it declares cpu"),
        (True, ("cpu", "cuda"), "tpu", "unknown device 'tpu'"),
    ],
)
def test_resolve_device_errors(
    monkeypatch: pytest.MonkeyPatch,
    has_gpu: bool,
    devices: tuple[str, ...],
    requested: str,
    fragment: str,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_gpu)
    adapter = from_object(SimpleNamespace(layer_norm=_layer_norm, normconf_devices=devices), "a")
    with pytest.raises(AdapterError) as info:
        resolve_device(adapter, requested)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


# -- lazy imports ------------------------------------------------------------------------------


def test_importing_impls_imports_no_backend() -> None:
    probe = textwrap.dedent(
        """
        import sys
        import impls
        from impls import available, load_adapter
        available()
        load_adapter("handwritten")
        load_adapter("torch")
        heavy = ("torch._dynamo", "torch._inductor", "onnxruntime", "onnx", "triton")
        print(",".join(name for name in heavy if name in sys.modules))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
