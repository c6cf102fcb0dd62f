"""What DDP needs beyond ``DistributedDataParallel``: joining the process group, stopping every rank at the
same step, and checking at the end that the ranks agree, then leaving the group without a hang.

Under ``torchrun --nproc_per_node=N`` (gloo on CPU, NCCL on GPU) each rank draws its own batches and the
gradients are averaged; without ``RANK`` in the environment a run is one process and none of this runs.
"""

import os
import signal
import threading

import torch
import torch.distributed as dist


def setup_distributed():
    """(rank, world size, device) of this process; joins the process group under torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


class StopOnSignal:
    """SIGINT and SIGTERM ask the loop to stop after the current step, which then saves as at the end.
    A second SIGINT interrupts at once (the usual KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def requested(self, world: int, device, time_up: bool = False) -> bool:
        """Whether to stop now (a signal, or ``time_up``); under DDP every rank stops at the same step when
        any rank asks, so none is left waiting in a collective."""
        stop = self.received is not None or time_up
        if world > 1:
            flag = torch.tensor([float(stop)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop


def ranks_agree(run) -> bool:
    """Whether every rank ended with the same weights (model and EMA); then leave the process group.

    Torn down in order: gloo's worker thread frees each finished collective (which needs the GIL), so
    wait for it (a barrier) and drop DDP's reducer while the group is still registered; destroying the
    group with a collective still to be freed deadlocked at exit (the worker waits for the GIL, the
    main thread holds it while joining the worker)."""
    flat = torch.cat([p.detach().flatten() for p in list(run.model.parameters()) + list(run.ema.parameters())])
    gathered = [torch.empty_like(flat) for _ in range(run.world)]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    dist.barrier()
    run.forward = run.model
    dist.destroy_process_group()
    return same
