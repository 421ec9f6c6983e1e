"""Hypothesis profiles for the suite; HYPOTHESIS_PROFILE selects one (default: ``dev``).

- ``dev``: quick local runs.
- ``ci``: more examples, no deadline (timing on shared CI machines is noisy), a fixed seed
  derivation so that a CI failure reproduces, and the reproduction blob printed on failure.
"""

import os

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
