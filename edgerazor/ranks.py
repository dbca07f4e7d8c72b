"""Which process of a multi-process launch this is, and the few collective steps ``edgerazor run`` needs.

Under ``torchrun``, ``deepspeed`` or ``accelerate launch`` every rank runs the same command. Only rank 0
may touch the output folder (it renames, writes and removes), so the other ranks wait for it; when rank 0
fails there, the others learn it from a broadcast and stop with the same message instead of waiting in
a barrier until the process group's timeout. A failure inside a collective (a rank dies mid-training)
is left to the launcher, which stops the remaining workers when one exits.
"""

from __future__ import annotations

import os
from datetime import timedelta

from edgerazor.errors import EdgeRazorError

#: how long a rank waits for the others in a barrier or a broadcast before it gives up with an error
TIMEOUT = timedelta(minutes=int(os.environ.get("EDGERAZOR_DIST_TIMEOUT_MINUTES", "30")))


class OtherRankFailed(EdgeRazorError):
    """Rank 0 failed a step the others were waiting for; they stop with its message."""


def world_size() -> int:
    """The number of ranks the launcher started (1 outside a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init_process_group() -> None:
    """Join the launcher's process group once, before the run touches its output folder (gloo on CPU,
    NCCL on CUDA). The Trainer and DeepSpeed find it initialised and use it as it is."""
    if world_size() <= 1:
        return
    import warnings

    import torch
    import torch.distributed as dist

    # DeepSpeed calls torch's old collective names: one deprecation line per call, hundreds per step
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)


def shutdown() -> None:
    """Leave the process group together: every rank reaches this barrier before any closes its connections
    (a gloo peer that vanishes while another still talks to it aborts that one)."""
    if not _distributed():
        return
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _distributed() -> bool:
    if world_size() <= 1:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()


def broadcast(value):
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if not _distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value) -> list:
    """Every rank's ``value``, in rank order (``[value]`` in one process)."""
    if not _distributed():
        return [value]
    import torch.distributed as dist

    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    return every


def on_main(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 only; every rank returns its result. If it raises there, rank 0
    re-raises and the other ranks raise ``OtherRankFailed`` with the same message, so no rank hangs."""
    if not _distributed():
        return fn(*args, **kwargs)
    outcome = None
    error = None
    if is_main():
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others are told
            error = exc
            outcome = ("error", f"{type(exc).__name__}: {exc}".splitlines()[0])
    outcome = broadcast(outcome)
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise OtherRankFailed(f"rank 0 failed: {outcome[1]}")
    return outcome[1]

