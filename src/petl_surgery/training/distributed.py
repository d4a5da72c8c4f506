"""Training under torchrun (``torchrun --nproc_per_node N -m petl_surgery train ...``): one process per
device, DistributedDataParallel over the trainable parameters (gloo on the CPU, NCCL on CUDA), each rank
reading its shard of the data through a DistributedSampler, rank 0 saving and printing.

Outside torchrun the same sampler serves one process (world size 1): the order of an epoch is then
``torch.randperm`` seeded with ``seed + epoch``, and N processes with batch B each train on exactly the
batches one process with batch N x B trains on (rank r takes every N-th image of the same order).
"""

from __future__ import annotations

import os
from typing import Any, List, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..errors import SurgeryError

# Every tensor handed to a collective, referenced from Python until the process group is destroyed.
# Why: gloo's worker thread drops its reference to a finished collective's tensors after the caller's
# wait() has returned. If the caller's Python tensor is gone by then, that drop frees the Python object
# and needs the GIL; destroy_process_group() holds the GIL while the group's destructor joins that very
# thread: a deadlock. It hung about one 2-process CPU launch in five on torch 2.6 (the rank that reaches
# finish() first, right after the last all_reduce; benchmarks/torchrun_stress.py shows the stacks); not
# seen with torch 2.14. One small tensor an epoch: nothing worth freeing earlier.
_handed_to_collectives: List[torch.Tensor] = []


def launched() -> bool:
    """True in a process torchrun started with more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def start(device: torch.device) -> torch.device:
    """Under torchrun, join the process group (NCCL for CUDA, gloo for the CPU) and give the device of
    this rank (``cuda:LOCAL_RANK`` for CUDA); outside torchrun, ``device`` unchanged."""
    if not launched() or active():
        return device
    if not dist.is_available():
        raise SurgeryError("torchrun started several processes, but this torch has no torch.distributed")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise SurgeryError(f"distributed training runs on CUDA (NCCL) or the CPU (gloo), not on {device.type}")
    dist.init_process_group(backend)
    return device


def finish() -> None:
    """Leave the process group this module joined (a no-op outside torchrun)."""
    if active():
        dist.destroy_process_group()
    _handed_to_collectives.clear()  # the group's threads are joined: nothing else references them now


def sampler(dataset: Any, seed: int) -> torch.utils.data.DistributedSampler:
    """This rank's shard of ``dataset``, shuffled with ``seed`` (call ``set_epoch`` each epoch). With more
    ranks than images divide evenly, DistributedSampler repeats a few images so every rank has as many."""
    return torch.utils.data.DistributedSampler(
        dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed, drop_last=False
    )


def sum_over_ranks(values: Sequence[float], device: torch.device) -> List[float]:
    """``values`` summed over all ranks (themselves outside torchrun)."""
    if not active():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    _handed_to_collectives.append(tensor)
    dist.all_reduce(tensor)
    return tensor.tolist()


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel (its trainable parameters' gradients averaged over ranks)."""
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)
