"""Demonstration: exact references for a few rows, under several conventions, beside PyTorch.

Run with ``python -m references.demo``. For each row it prints the correctly rounded LayerNorm
under PyTorch's convention, the seed document's hand-written convention (biased std, ε added to the
std, ε = 1e-6) and the Annotated Transformer's (unbiased std, ε added to the std), then what
``torch.nn.functional.layer_norm`` returns and how many float32 ulps it is from the exact result.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from references import layer_norm, rms_norm
from references.formats import format_of
from references.presets import get_preset

ROWS: dict[str, list[float]] = {
    "ordinary": [0.5, -1.25, 2.0, 3.5, -0.75, 1.0, 0.0, -2.5],
    "large mean, small spread (kappa ~ 1e6)": [1e6 + d for d in (0.5, -0.25, 0.75, 0.0, -1.0)],
    "variance near eps": [1e-3, -1e-3, 2e-3, 0.0, -2e-3],
    "constant": [3.0, 3.0, 3.0, 3.0],
}


def _ulps(actual: torch.Tensor, exact: torch.Tensor) -> list[float]:
    fmt = format_of(exact.dtype)
    return [
        (float(a) - float(e)) / fmt.ulp(float(e))
        for a, e in zip(actual.tolist(), exact.tolist(), strict=True)
    ]


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v: .9g}" for v in values) + "]"


def main() -> int:
    for name, row in ROWS.items():
        x = torch.tensor([row], dtype=torch.float32)
        n = x.shape[-1]
        print(f"\n== {name}: x = {_fmt(x[0].tolist())}")
        for preset in ("pytorch.layer_norm", "seed.layer_norm", "annotated_transformer.layer_norm"):
            exact = layer_norm(x, n, **get_preset(preset).arguments())
            print(f"  {preset:34s} {_fmt(exact[0].tolist())}")
        reference = layer_norm(x, n)
        actual = F.layer_norm(x, (n,))
        print(f"  {'torch.nn.functional.layer_norm':34s} {_fmt(actual[0].tolist())}")
        ulps = _ulps(actual[0], reference[0])
        print(f"  {'  its error in float32 ulps':34s} {_fmt(ulps)}")
    x = torch.tensor([[0.75, -1.5, 2.25, 0.125]], dtype=torch.bfloat16)
    w = torch.tensor([0.5, -0.25, 0.0, 1.0], dtype=torch.bfloat16)
    print(
        f"\n== RMSNorm, bfloat16: x = {_fmt(x[0].float().tolist())}, w = {_fmt(w.float().tolist())}"
    )
    for preset in ("pytorch.rms_norm", "hf.llama.rms_norm", "hf.gemma.rms_norm"):
        exact = rms_norm(x, 4, w, **get_preset(preset).arguments())
        print(f"  {preset:34s} {_fmt(exact[0].float().tolist())}")
    actual = F.rms_norm(x, (4,), w)
    print(f"  {'torch.nn.functional.rms_norm':34s} {_fmt(actual[0].float().tolist())}")
    print("\nEvery reference value above is the exact result correctly rounded into the dtype.")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=9)
    sys.exit(main())
