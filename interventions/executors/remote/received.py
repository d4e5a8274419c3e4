"""What comes back from a server is data to check, not to trust.

A result is unpickled from the server's bytes: its tensors can carry autograd state (NDIF adds no
``no_grad`` around a block; a model whose parameters require grad returns states that do), sit
on another device, or have a dtype or shape other than the request asked for. Every value the
remote path uses passes :func:`received_tensor` first.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .faults import RemoteRunError

KINDS = {"float": torch.is_floating_point,
         "int": lambda t: not torch.is_floating_point(t) and not torch.is_complex(t)
         and t.dtype != torch.bool}


def received_tensor(value, what: str, shape: Sequence[int | None], kind: str) -> torch.Tensor:
    """``value`` detached, on the CPU, checked to be a tensor of ``kind`` (``"float"`` or
    ``"int"``) and ``shape`` (``None`` matches any size of that dimension).

    Raises :class:`~.faults.RemoteRunError` (one line naming ``what``, what came and what was
    expected) otherwise.
    """
    dims = ", ".join("*" if n is None else str(n) for n in shape)
    expected = f"a {kind} tensor of shape ({dims})"
    if not isinstance(value, torch.Tensor):
        raise RemoteRunError(f"the server returned {what} as {type(value).__name__}, not "
                             f"{expected}")
    value = value.detach().cpu()
    fits = value.dim() == len(shape) and all(n is None or n == got
                                             for n, got in zip(shape, value.shape))
    if not KINDS[kind](value) or not fits:
        raise RemoteRunError(f"the server returned {what} as a {str(value.dtype)} tensor of "
                             f"shape {tuple(value.shape)}, not {expected}")
    return value
