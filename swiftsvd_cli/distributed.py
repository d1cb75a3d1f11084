"""Several processes, one result: rank, disjoint slices, float64 sums, owners by cost, and one deciding process.

Under `torchrun` or `accelerate launch` (WORLD_SIZE > 1) accelerate's `PartialState` joins the process group:
NCCL where CUDA exists, gloo otherwise (a bare `PartialState()` on a CPU-only machine reports one process, so
every rank would process all the data: `cpu=True` there). In a plain single process no process group exists and
every helper is the identity, so the one-process path runs exactly as before and imports no accelerate.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from swiftsvd_cli.errors import SwiftSVDError

if TYPE_CHECKING:
    from accelerate import PartialState

T = TypeVar("T")
_state: PartialState | None = None


def launched() -> bool:
    """Started by a launcher with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def state() -> PartialState | None:
    """The process group's state (created once), or None in a single process."""
    global _state
    if _state is None and launched():
        from accelerate import PartialState

        _state = PartialState(cpu=not torch.cuda.is_available())
    return _state


def rank() -> int:
    current = state()
    return 0 if current is None else int(current.process_index)


def world_size() -> int:
    current = state()
    return 1 if current is None else int(current.num_processes)


def is_main() -> bool:
    return rank() == 0


def local_device(device: str) -> str:
    """Each process of a node on its own GPU: bare `cuda` becomes `cuda:LOCAL_RANK` when launched."""
    current = state()
    if device == "cuda" and current is not None:
        return f"cuda:{current.local_process_index}"
    return device


def barrier() -> None:
    current = state()
    if current is not None:
        current.wait_for_everyone()


def my_share(items: Sequence[T], what: str) -> list[T]:
    """This process's contiguous, deterministic share of `items` (shares are disjoint and cover all items).

    Every process needs at least one item (an empty share would run an empty forward pass), so fewer items
    than processes is a user error naming `what`.
    """
    current = state()
    if current is None:
        return list(items)
    if len(items) < current.num_processes:
        raise SwiftSVDError(f"{len(items)} {what} for {current.num_processes} processes: give at least one per process")
    with current.split_between_processes(list(items)) as share:
        return list(share)


def owners(costs: Sequence[float], processes: int) -> list[int]:
    """The owning process of each item, balancing total cost (largest first, to the least loaded; ties: lowest rank).

    Deterministic, so every process computes the same assignment without communicating.
    """
    loads = [0.0] * processes
    owner = [0] * len(costs)
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        chosen = min(range(processes), key=lambda p: (loads[p], p))
        owner[item] = chosen
        loads[chosen] += costs[item]
    return owner


def _collective_device() -> torch.device:
    current = state()
    assert current is not None
    return current.device if current.backend == "nccl" else torch.device("cpu")  # NCCL reduces on GPUs only


def sum_over_processes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor summed over all processes (every process gets the sums), in the tensor's own dtype and device.

    Made contiguous first: gloo silently mis-orders a non-contiguous tensor (an eigh result is one).
    """
    if state() is None:
        return tensors
    import torch.distributed as dist

    summed: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        buffer = tensor.detach().to(_collective_device()).contiguous()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        summed[name] = buffer.to(tensor.device)
    return summed


def everyone(work: Callable[[], T]) -> list[T]:
    """`work()` run by every process; every process's result, in rank order, on every process.

    An error in any process is raised by all of them (as a SwiftSVDError naming the process, where it did not
    happen): none waits in a collective for one that stopped.
    """
    if state() is None:
        return [work()]
    import torch.distributed as dist

    failed: Exception | None = None
    try:
        mine: tuple[Any, str | None] = (work(), None)
    except Exception as error:  # told to the others, then raised here as it is
        failed, mine = error, (None, f"process {rank()}: {error}")
    results: list[Any] = [None] * world_size()
    dist.all_gather_object(results, mine)
    if failed is not None:
        raise failed
    failures = [message for _, message in results if message is not None]
    if failures:
        raise SwiftSVDError(failures[0])
    return [value for value, _ in results]


def main_decides(decide: Callable[[], T]) -> T:
    """`decide()` run by the main process only, its result (or its error, as a SwiftSVDError) handed to every process.

    For checks and writes only one process may make (locks, manifests, clearing a WORK): the other processes
    raise the same one-line error instead of waiting forever in a collective the main process never reaches.
    """
    if state() is None:
        return decide()
    import torch.distributed as dist

    message: list[Any] = [None, None]
    if is_main():
        try:
            message = [decide(), None]
        except Exception as error:
            message = [None, str(error)]
            dist.broadcast_object_list(message, src=0)
            raise
    dist.broadcast_object_list(message, src=0)
    if message[1] is not None:
        raise SwiftSVDError(message[1])
    return message[0]  # type: ignore[no-any-return]
