"""Example third-party EdgeRazor plugin (see docs/plugins.md).

Registers
* the allocation ``every_other``: ``round(rho * d_out)`` 4-bit rows, taken among the rows of one
  parity (odd rows by default, ``allocation_options: {parity: 0}`` for even rows) starting from the
  LAST row; if rho asks for more rows than that parity has, the other parity is filled the same way.
  With rho = 0.5 and an even ``d_out`` the 4-bit rows are exactly 1, 3, 5, ... (``parity=1``).
* the loss term ``logit_l2``: the mean squared difference of student and teacher logits.
"""

from __future__ import annotations

import torch

from edgerazor import hookimpl


def every_other(d_out: int, rho: float, parity: int = 1, **context) -> torch.Tensor:
    """Row mask of shape ``[d_out]``; True marks a 4-bit row."""
    rows = torch.arange(d_out - 1, -1, -1)  # last row first
    order = torch.cat([rows[rows % 2 == parity % 2], rows[rows % 2 != parity % 2]])
    mask = torch.zeros(d_out, dtype=torch.bool)
    mask[order[: round(rho * d_out)]] = True
    return mask


def logit_l2(student_out, teacher_out, batch) -> torch.Tensor:
    """Mean squared difference of the logits (a scalar)."""
    return (student_out.logits.float() - teacher_out.logits.float()).pow(2).mean()


@hookimpl
def register_allocations(register):
    register("every_other", every_other)


@hookimpl
def register_losses(register):
    register("logit_l2", logit_l2)
