"""A gloo process group for one spawned test rank, rendezvous through a file (no TCP port to pick
and lose to another process on a busy machine); every rank meets at a barrier before teardown,
so no rank drops its gloo pairs while another still talks to it."""
import contextlib
import os

import torch
import torch.distributed as dist


@contextlib.contextmanager
def gloo_group(rank: int, world: int, out_dir: str):
    torch.set_num_threads(1)
    store = os.path.join(out_dir, "rendezvous")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
