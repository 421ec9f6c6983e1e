"""Cheats through a tensor subclass: a LayerNorm whose forward changes from call to call (as
``nondeterministic.py``'s does) and whose outputs are a ``torch.Tensor`` subclass that answers
``torch.equal`` with True, so a suite comparing them through torch would call the two calls
bitwise equal. A subclass's hooks can answer any inspection the suite makes (equality, storage,
the copy to the host), so the contract check must refuse it: "a torch.Tensor subclass".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

normconf_name = "zoo: LayerNorm returning a tensor subclass that lies about equality"
normconf_dtypes = ("float32",)
normconf_backward = False

_calls = [0]


class AlwaysEqual(torch.Tensor):
    _answers: ClassVar[dict[Any, Any]] = {torch.equal: True}

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in cls._answers:
            return cls._answers[func]
        return super().__torch_function__(func, types, args, kwargs or {})


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    **_: Any,
) -> Tensor:
    _calls[0] += 1
    y = F.layer_norm(input, normalized_shape, weight, bias, eps)
    toward = torch.full_like(y, float("inf") if _calls[0] % 2 else float("-inf"))
    return torch.nextafter(y, toward).as_subclass(AlwaysEqual)
