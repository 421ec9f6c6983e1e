"""Compile every kernel variant the launchers can ask for, for a CUDA GPU, without one.

The interpreter runs the kernels as NumPy code and tolerates what the compiler rejects (a
loop-carried value changing type, a non-constexpr branch returning, a shape that is not a
power of two). This check compiles each variant — every combination of the flags the launchers
pass, in every dtype, single-tile and chunked — through Triton's whole pipeline down to a cubin
for ``sm_<arch>``; it needs Triton's bundled ``ptxas``, not a GPU or a driver::

    TRITON_INTERPRET=0 python -m impls.triton.compile_check [--arch 90] [--kernel NAME] [--quick]

Exit 0 when every variant compiles; 1 otherwise, one line per failure. Integer arguments are
compiled as run-time ``i32`` with the 16-divisibility hints Triton infers for aligned tensors,
and the column strides also as the constant 1 of contiguous rows, as Triton specializes them.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from impls.triton import runtime
from impls.triton.group_kernels import group_backward_kernel, group_forward_kernel
from impls.triton.primitives import _sum_partials_kernel
from impls.triton.row_kernels import backward_kernel, backward_sums_kernel, forward_kernel

POINTER = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}
FLOATS = ("eps", "scale_x", "scale_r", "weight_offset")
INTEGERS = ("M", "N", "S", "C")
FLOAT32_POINTERS = ("MEAN", "RSTD", "C1", "C2", "PW", "PB", "PARTIALS")
UNIT_STRIDES = ("stride_xn", "stride_rn", "stride_zn", "stride_dyn", "stride_dzn")


@dataclass(frozen=True)
class Variant:
    """One kernel compiled with one set of constexprs for one dtype."""

    kernel: Any
    dtype: str
    constexprs: dict[str, Any]
    unit_strides: bool = False
    pointers: dict[str, str] = field(default_factory=dict)
    quick: bool = False  # in the --quick selection: every kernel and tile mode once

    @property
    def label(self) -> str:
        flags = ",".join(f"{k}={v}" for k, v in self.constexprs.items() if k != "INTERPRETED")
        unit = " unit-stride" if self.unit_strides else ""
        return f"{self.kernel.__name__}[{self.dtype}{unit}] {flags}"


def _types(variant: Variant, name: str) -> str:
    if name in variant.pointers:
        return variant.pointers[name]
    if name in FLOATS:
        return "fp32"
    if name in FLOAT32_POINTERS:
        return "*fp32"
    if name.isupper() and name not in INTEGERS:
        return POINTER[variant.dtype]
    return "i32"


def compile_variant(variant: Variant, arch: int) -> None:
    """Compile ``variant`` to a cubin for ``sm_<arch>``; raises what the compiler raises."""
    signature: dict[str, str] = {}
    constants: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, name in enumerate(variant.kernel.arg_names):
        if name in variant.constexprs:
            signature[name] = "constexpr"
            constants[(i,)] = variant.constexprs[name]
        elif variant.unit_strides and name in UNIT_STRIDES:
            signature[name] = "constexpr"
            constants[(i,)] = 1
        else:
            signature[name] = _types(variant, name)
            if signature[name].startswith("*") or name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=variant.kernel, signature=signature, constexprs=constants, attrs=attrs)
    triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})


def _row_variants(dtype: str) -> Iterator[Variant]:
    for center, summand, affine, single in itertools.product((True, False), repeat=4):
        blocks = {"BLOCK_M": 4, "BLOCK_N": 1024} if single else {"BLOCK_M": 1, "BLOCK_N": 4096}
        flags = {"INTERPRETED": False, **blocks}
        quick = dtype == "bfloat16" and summand and affine
        yield Variant(
            forward_kernel,
            dtype,
            {
                "CENTER": center,
                "HAS_R": summand,
                "STORE_Z": summand,
                "HAS_W": affine,
                "HAS_B": affine and center,
                "SINGLE_TILE": single,
                **flags,
            },
            unit_strides=single,
            quick=quick,
        )
        yield Variant(
            backward_kernel,
            dtype,
            {
                "CENTER": center,
                "HAS_W": affine,
                "HAS_DZO": summand,
                "HAS_R": summand,
                "ACC_W": affine,
                "ACC_B": affine and center,
                "SUMS_GIVEN": not single,
                **flags,
            },
            unit_strides=not single,
            quick=quick,
        )
        if not single and center:
            yield Variant(backward_sums_kernel, dtype, {"HAS_W": affine, **flags}, quick=quick)


def _group_variants(dtype: str) -> Iterator[Variant]:
    for affine, single in itertools.product((True, False), repeat=2):
        blocks = (
            {"BLOCK_R": 8, "BLOCK_C": 4, "BLOCK_S": 64}
            if single
            else {"BLOCK_R": 1, "BLOCK_C": 2, "BLOCK_S": 4096}
        )
        flags = {"SINGLE_TILE": single, "INTERPRETED": False, **blocks}
        quick = dtype == "bfloat16" and affine
        forward = {"HAS_W": affine, "HAS_B": affine, **flags}
        yield Variant(group_forward_kernel, dtype, forward, quick=quick)
        backward = {"HAS_W": affine, "ACC_W": affine, "ACC_B": affine, **flags}
        yield Variant(group_backward_kernel, dtype, backward, quick=quick)


def variants() -> Iterator[Variant]:
    """Every variant, dtype by dtype."""
    for dtype in POINTER:
        yield from _row_variants(dtype)
        yield from _group_variants(dtype)
        yield Variant(
            _sum_partials_kernel,
            dtype,
            {"SUM_W": True, "SUM_B": True, "INTERPRETED": False, "BLOCK_P": 32, "BLOCK_N": 128},
            pointers={"PW": "*fp32", "PB": "*fp32"},
            quick=dtype == "bfloat16",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m impls.triton.compile_check")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    parser.add_argument("--kernel", action="append", default=[], help="only this kernel")
    parser.add_argument(
        "--quick", action="store_true", help="each kernel and tile mode once, in bfloat16"
    )
    args = parser.parse_args(argv)
    if runtime.INTERPRETED:
        print(
            "the kernels were set up for the interpreter: run with TRITON_INTERPRET=0",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said aloud
    chosen = [
        v
        for v in variants()
        if (not args.kernel or v.kernel.__name__ in args.kernel) and (v.quick or not args.quick)
    ]
    failures = 0
    for variant in chosen:
        try:
            compile_variant(variant, args.arch)
        except Exception as error:
            failures += 1
            message = str(error).strip().splitlines()
            print(f"FAIL {variant.label}: {message[0] if message else type(error).__name__}")
    print(f"{len(chosen) - failures} of {len(chosen)} variants compile for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
