r"""Data parallelism: the same training run spread over several processes (one per GPU).

Every process ("rank") holds the full model, a full copy of the optimizer, and the whole data set. A step:

    1. every rank draws the same global batch of B images (same seed, same generator), and keeps its own
       contiguous slice of b = B / N rows: rank r takes rows r*b .. (r+1)*b - 1;
    2. every rank computes the loss on its b rows and calls backward;
    3. during backward, DistributedDataParallel (DDP) all-reduces the gradients: it sums each gradient
       over the N ranks and divides by N, in buckets, overlapped with the rest of backward;
    4. every rank now holds the same averaged gradient and takes the same optimizer step, so the N
       copies of the model stay identical without ever sending weights.

Why this equals one process with batch B: the loss is a mean over the batch, and the mean of N slice
means (equal slices) is the mean over the whole batch, so the averaged gradient is the full batch's
gradient. Only the order of the float additions differs.

Which rows a rank gets is usually decided by torch's DistributedSampler: it shuffles the data with a
seed shared by all ranks and gives rank r every N-th index. course_lib.train does the equivalent by
hand (the whole global batch is drawn on every rank, each keeps its slice), so that the timesteps,
noise, flips and caption dropout are also the single process's draws, and a 2-process run reproduces a
1-process run step for step.

Side effects happen once: only rank 0 shows a progress bar, prints, and writes checkpoints. All ranks
hold the same weights, so N writers would only race on the same file; the others wait at a barrier
until rank 0 has finished, so no rank reads a half-written checkpoint.

Launch with torchrun, which starts N copies of a script and gives each its environment:
    torchrun --nproc_per_node=2 scripts/train_ddp.py
    WORLD_SIZE  number of processes N          RANK        this process's index, 0 .. N-1
    LOCAL_RANK  its index on this machine      MASTER_ADDR, MASTER_PORT  where rank 0 listens

References:
    [1] PyTorch, "Getting started with Distributed Data Parallel",
        https://pytorch.org/tutorials/intermediate/ddp_tutorial.html
    [2] Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training",
        https://arxiv.org/abs/2006.15704
    [3] torchrun, https://pytorch.org/docs/stable/elastic/run.html
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among world_size processes, and the device it trains on."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of processes training together; 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's index, 0 .. world_size - 1; 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """True on the one process that logs and writes files (rank 0)."""
    return rank() == 0


def setup() -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or do nothing in a single process.

    Backend "nccl" (GPU to GPU) when CUDA is available, else "gloo" (CPU). Each process takes the GPU
    cuda:LOCAL_RANK, or the CPU."""
    if is_initialized():                                    # already joined (e.g. by the caller)
        local = int(os.environ.get("LOCAL_RANK", rank()))
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        return DistInfo(rank(), world_size(), local, device)
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n <= 1:                                              # one process: nothing to set up
        return DistInfo(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={n} but {', '.join(missing)} not set; launch with "
                           f"`torchrun --nproc_per_node=N script.py`, which sets {', '.join(TORCHRUN_VARIABLES)}")
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)                        # before init, so NCCL uses this rank's GPU
        backend, device = "nccl", torch.device("cuda", local)
    else:
        backend, device = "gloo", torch.device("cpu")
    dist.init_process_group(backend, init_method="env://")  # reads RANK, WORLD_SIZE, MASTER_ADDR/PORT
    return DistInfo(rank(), world_size(), local, device)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over all ranks (the same result on every rank); `tensor` itself in one process."""
    if world_size() == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / world_size()


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in one process)."""
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (call once at the end of a torchrun script)."""
    if is_initialized():
        dist.destroy_process_group()
