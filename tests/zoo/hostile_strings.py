"""Hostile strings: PyTorch's LayerNorm under a name, and with an exception message, built to
break every report format and the terminal.

The name and the float16 error hold HTML (``<script>``), a Markdown table breaker (``|``), a line
break that would start a heading and a ``javascript:`` link, backticks, an ANSI escape that
clears the screen, a bidi override that reverses what follows, characters XML 1.0 cannot hold
(NUL, vertical tab) and the end of a CDATA section. float32 is PyTorch's and passes; every
float16 call raises ``RuntimeError(HOSTILE)``, whose first line becomes the check's message
"raised RuntimeError: …". Every report must show these as the literal text they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

#: One line of everything a report or a terminal could take for markup or a command. Nothing in
#: it is a line break to :meth:`str.splitlines`, so all of it reaches the check's message.
HOSTILE_LINE = (
    "<script>alert(1)</script> | cell | `tick` ```fence "
    "\x1b[2J\x1b]0;title\x07 \u202eevil\u202c \x00nul ]]> <!-- &amp;"
)
#: The line, then line breaks (newline, vertical tab, carriage return, U+2028) that would start
#: a heading or a link if a report let them through.
HOSTILE = HOSTILE_LINE + "\n# heading\x0b[link](javascript:alert(1))\r## second\u2028- item"

normconf_name = f"zoo: hostile {HOSTILE}"
normconf_dtypes = ("float32", "float16")


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    **_: Any,
) -> Tensor:
    if input.dtype == torch.float16:
        raise RuntimeError(HOSTILE)
    return F.layer_norm(input, normalized_shape, weight, bias, eps)
