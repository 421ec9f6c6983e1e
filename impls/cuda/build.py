"""Build the CUDA kernels of :mod:`impls.cuda`, and compile-check them without a GPU.

One place for the compiler flags: :func:`nvcc_flags` and :data:`CXX_FLAGS` serve both the real
build (:func:`load`, through ``torch.utils.cpp_extension.load``) and the check
(:func:`compile_check`), which compiles every source to an object file with nvcc in a temporary
directory — no link, so it needs nvcc and torch's headers but neither a GPU nor a CUDA build of
torch.

The build happens on the first call of a norm function, never at import. Built libraries are
cached under ``$NORMCONF_CACHE/cuda`` (default ``~/.cache/normconf/cuda``), one directory per
extension name (which names the GPU architectures), torch version and CUDA version; torch
rebuilds when a source or flag changes and serialises concurrent builds with a lock file. Within
a process the loaded operators are memoized, and so is a failed build (it is not retried).

Floating point: no ``--use_fast_math``. It implies ``--ftz=true`` (subnormal inputs and results
flushed to zero, so every subnormal case would fail), ``--prec-div=false`` and
``--prec-sqrt=false`` (approximate division and square root: a larger error in rstd and the
mean), and fast intrinsics. The IEEE settings are spelled out in :data:`NVCC_MATH_FLAGS` so that
a global fast-math default cannot slip in. ``--fmad=true`` (the default) is kept: fused
multiply-adds round once instead of twice.

Command line: ``python3 -m impls.cuda.build --check`` compiles for sm_80 and sm_90 and exits 0,
1 with nvcc's messages when a source does not compile, or 2 with one line when nvcc is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CSRC = Path(__file__).resolve().with_name("csrc")
#: Compiled sources, in build order; the headers (``common.cuh``, ``launch.h``) are included.
SOURCES = ("forward.cu", "backward.cu", "binding.cpp")
#: The torch operator namespace the library registers: ``torch.ops.normconf_cuda``.
NAMESPACE = "normconf_cuda"
#: GPU architectures of the compile check: Ampere (A100) and Hopper (H100, H200).
CHECK_ARCHS = ("80", "90")
#: IEEE single precision on the device (see the module docstring).
NVCC_MATH_FLAGS = ("--ftz=false", "--prec-div=true", "--prec-sqrt=true", "--fmad=true")
NVCC_FLAGS = ("-O3", "-std=c++20", *NVCC_MATH_FLAGS)
CXX_FLAGS = ("-O3", "-std=c++20")
#: The header that CUDA builds of torch generate and CPU wheels lack; it only defines
#: C10_CUDA_BUILD_SHARED_LIBS for Windows DLL exports, so the check may skip it.
_CMAKE_MACROS = Path("c10", "cuda", "impl", "cuda_cmake_macros.h")

_lock = threading.Lock()
_loaded: Any = None
_failure: BaseException | None = None


class NvccNotFound(RuntimeError):
    """There is no nvcc to compile with."""


class CompileError(RuntimeError):
    """A source did not compile; the message holds nvcc's output."""


def gencode(archs: Sequence[str]) -> list[str]:
    """``-gencode`` flags for real code (SASS) of each architecture, e.g. ``"90"`` -> sm_90."""
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]


def nvcc_flags(archs: Sequence[str]) -> list[str]:
    """Flags for nvcc on the ``.cu`` sources, beyond those torch adds itself."""
    return [*NVCC_FLAGS, *gencode(archs)]


def cache_dir() -> Path:
    """Where built libraries are kept: ``$NORMCONF_CACHE/cuda``, else ``~/.cache/normconf/cuda``."""
    root = os.environ.get("NORMCONF_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "normconf") / "cuda"


def find_nvcc() -> str:
    """nvcc from ``$CUDA_HOME``/``$CUDA_PATH``, else the ``PATH``; :class:`NvccNotFound` if none."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(variable)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found is None:
        raise NvccNotFound(
            "nvcc not found: install the CUDA toolkit, or set CUDA_HOME to it, to build the "
            "normconf CUDA kernels"
        )
    return found


def toolkit_root(nvcc: str) -> Path | None:
    """The CUDA toolkit nvcc belongs to (the directory with ``include/cuda_runtime_api.h``),
    also when nvcc is a wrapper script elsewhere; None when it cannot be told."""
    candidate = Path(os.path.realpath(nvcc)).parent.parent
    if (candidate / "include" / "cuda_runtime_api.h").is_file():
        return candidate
    try:
        dry = subprocess.run(
            [nvcc, "-dryrun", "-E", "-x", "cu", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    return Path(os.path.normpath(match.group(1).strip())) if match else None


# -- the compile check ---------------------------------------------------------------------------


def _torch_include_flags() -> list[str]:
    """torch's and Python's headers (as ``cpp_extension.load`` passes them), and ours."""
    from torch.utils.cpp_extension import include_paths

    paths = [*include_paths(), sysconfig.get_path("include")]
    flags = [f"-I{CSRC}"]
    for path in paths:
        flags += ["-isystem", path]
    if not any((Path(path) / _CMAKE_MACROS).is_file() for path in paths):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def _torch_nvcc_defines() -> list[str]:
    """The flags ``cpp_extension.load`` gives nvcc on its own (no half operators, relaxed
    constexpr), so that the check compiles what the build compiles."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return list(COMMON_NVCC_FLAGS)


def compile_command(nvcc: str, source: Path, output: Path, archs: Sequence[str]) -> list[str]:
    """The nvcc command line that compiles ``source`` into the object file ``output``.

    ``.cu`` files get device code for ``archs``; a ``.cpp`` file (the torch binding) is host
    code that nvcc hands to the host compiler, as the build's C++ compiler sees it.
    """
    common = [
        nvcc,
        "-c",
        str(source),
        "-o",
        str(output),
        f"-DTORCH_EXTENSION_NAME={NAMESPACE}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-Xcompiler",
        "-fPIC",
        *_torch_include_flags(),
    ]
    if source.suffix == ".cu":
        return [*common, *_torch_nvcc_defines(), *nvcc_flags(archs)]
    return [*common, *CXX_FLAGS]


@dataclass(frozen=True)
class Compiled:
    """One source's compilation: nvcc's exit status and what it printed."""

    source: Path
    returncode: int
    output: str


def _require(paths: Sequence[Path]) -> None:
    """Every source must exist: an installation without ``impls/cuda/csrc`` cannot build."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CompileError(
            f"sources not found: {', '.join(missing)} (is impls/cuda/csrc installed with the "
            "package?)"
        )


def _compile(nvcc: str, source: Path, directory: Path, archs: Sequence[str]) -> Compiled:
    output = directory / f"{source.name}.o"
    command = compile_command(nvcc, source, output, archs)
    done = subprocess.run(command, capture_output=True, text=True)
    return Compiled(source, done.returncode, (done.stdout + done.stderr).strip())


def compile_check(
    sources: Sequence[Path] | None = None,
    archs: Sequence[str] = CHECK_ARCHS,
    nvcc: str | None = None,
) -> float:
    """Compile ``sources`` (default: every source of the kernels) to object files in a
    temporary directory, in parallel; return the seconds it took.

    Raises :class:`NvccNotFound` without nvcc and :class:`CompileError`, with nvcc's output, when
    a source does not compile.
    """
    nvcc = nvcc or find_nvcc()
    paths = [Path(s) for s in sources] if sources is not None else [CSRC / s for s in SOURCES]
    _require(paths)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="normconf-cuda-check-") as temporary:
        with ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1))) as pool:
            results = list(pool.map(lambda p: _compile(nvcc, p, Path(temporary), archs), paths))
    failed = [r for r in results if r.returncode != 0]
    if failed:
        raise CompileError(
            "\n".join(f"{r.source.name}: nvcc exited {r.returncode}\n{r.output}" for r in failed)
        )
    return time.perf_counter() - started


# -- the CPU emulation of the kernels (tests) ------------------------------------------------------


def emulation_command(nvcc: str, output: Path) -> list[str]:
    """The command that builds ``csrc/emulation.cpp`` — the kernels and launchers under the CPU
    emulation of ``csrc/emulation.h`` — into the shared library ``output`` (nvcc as the host
    compiler's driver: no device code, the CUDA headers for the 16-bit types)."""
    return [
        nvcc,
        "-x",
        "c++",
        *CXX_FLAGS,
        "-shared",
        "-Xcompiler",
        "-fPIC,-Wall,-Wextra,-Wno-unknown-pragmas",
        f"-I{CSRC}",
        str(CSRC / "emulation.cpp"),
        "-o",
        str(output),
        "-lpthread",
    ]


def build_emulation(directory: Path, nvcc: str | None = None) -> Path:
    """The emulation library in ``directory``, built unless a build of the same sources and
    command is there; :class:`CompileError` on failure."""
    nvcc = nvcc or find_nvcc()
    _require([CSRC / "emulation.cpp", *(CSRC / s for s in SOURCES)])
    digest = hashlib.sha256(" ".join(emulation_command(nvcc, Path("out"))).encode())
    for source in sorted(CSRC.iterdir()):
        digest.update(source.name.encode() + source.read_bytes())
    output = directory / f"normconf_cuda_emulation-{digest.hexdigest()[:16]}.so"
    if output.is_file():
        return output
    directory.mkdir(parents=True, exist_ok=True)
    partial = output.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run(emulation_command(nvcc, partial), capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise CompileError(f"emulation.cpp: exited {done.returncode}\n{done.stdout}{done.stderr}")
    os.replace(partial, output)  # atomic: a concurrent build of the same library is harmless
    return output


# -- the real build ------------------------------------------------------------------------------


def load() -> Any:
    """The ``torch.ops.normconf_cuda`` operators, built for the visible GPUs on first use.

    Raises RuntimeError when torch sees no GPU, the CUDA toolkit is not usable, or the build
    fails; the same error again on later calls in this process.
    """
    global _loaded, _failure
    with _lock:
        if _loaded is None and _failure is None:
            try:
                _loaded = _build_and_load()
            except Exception as error:
                _failure = error
        if _failure is not None:
            raise _failure
        return _loaded


def device_archs() -> list[str]:
    """The compute capabilities of the visible GPUs, e.g. ``["90"]`` on an H100."""
    import torch

    found = {
        "".join(map(str, torch.cuda.get_device_capability(i)))
        for i in range(torch.cuda.device_count())
    }
    return sorted(found, key=int)


def _build_and_load() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            "impls.cuda needs a CUDA GPU and a CUDA build of torch; torch sees no GPU here"
        )
    from torch.utils import cpp_extension

    _require([CSRC / source for source in SOURCES])
    _check_toolkit(cpp_extension.CUDA_HOME)
    archs = device_archs()
    name = f"{NAMESPACE}_sm{'_sm'.join(archs)}"
    directory = cache_dir() / f"{name}-torch{torch.__version__}-cuda{torch.version.cuda}"
    directory.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name=name,
            sources=[str(CSRC / source) for source in SOURCES],
            extra_cflags=list(CXX_FLAGS),
            extra_cuda_cflags=nvcc_flags(archs),
            extra_include_paths=[str(CSRC)],
            build_directory=str(directory),
            is_python_module=False,
        )
    except Exception as error:
        raise RuntimeError(
            f"building the normconf CUDA kernels in {directory} failed: {_first_error(error)}"
        ) from error
    return getattr(torch.ops, NAMESPACE)


def _check_toolkit(cuda_home: str | None) -> None:
    """torch's CUDA_HOME must hold the CUDA headers; say where they are when it does not."""
    if cuda_home and (Path(cuda_home) / "include" / "cuda_runtime_api.h").is_file():
        return
    try:
        root = toolkit_root(find_nvcc())
    except NvccNotFound as error:
        raise RuntimeError(str(error)) from None
    hint = f"set CUDA_HOME={root}" if root else "set CUDA_HOME to the CUDA toolkit"
    raise RuntimeError(
        f"torch looks for the CUDA toolkit in {cuda_home or '(nowhere)'}, which has no "
        f"include/cuda_runtime_api.h: {hint}"
    )


def _first_error(error: BaseException) -> str:
    """The first line of a build failure that names an error, else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() and not line.startswith("Error building extension"):
            return line
    return lines[0] if lines else type(error).__name__


# -- command line --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m impls.cuda.build", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="compile every source for sm_80 and sm_90 to object files (no GPU needed)",
    )
    parser.add_argument(
        "--arch",
        action="append",
        metavar="CC",
        help="compute capability to compile for, e.g. 90 (repeatable; default 80 and 90)",
    )
    args = parser.parse_args(argv)
    if not args.check:
        parser.error("nothing to do: pass --check")
    archs = tuple(args.arch or CHECK_ARCHS)
    try:
        nvcc = find_nvcc()
        seconds = compile_check(archs=archs, nvcc=nvcc)
    except NvccNotFound as error:
        print(f"impls.cuda.build: {error}", file=sys.stderr)
        return 2
    except CompileError as error:
        print(error, file=sys.stderr)
        print("impls.cuda.build: the compile check failed", file=sys.stderr)
        return 1
    targets = ", ".join(f"sm_{arch}" for arch in archs)
    print(f"compiled {', '.join(SOURCES)} for {targets} with {nvcc} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
