"""Hypothesis profiles for the suite; HYPOTHESIS_PROFILE selects one (default: ``dev``).

- ``dev``: quick local runs.
- ``ci``: more examples, no deadline (timing on shared CI machines is noisy), a fixed seed
  derivation so that a CI failure reproduces, and the reproduction blob printed on failure.

Without a GPU, ``TRITON_INTERPRET=1`` is set before any test imports triton: Triton reads it at
import, and a test of torch.compile (whose import pulls triton in) must not leave triton in
compiled mode for the triton adapter's tests that run after it in the same worker.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from hypothesis import settings

settings.register_profile("dev", max_examples=50)
settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
