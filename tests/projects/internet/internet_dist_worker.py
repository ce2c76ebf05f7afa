"""The worker of tests/projects/internet/test_buffer.py's two-process test, in a module of its own: spawned processes
unpickle it by module name, and a test module's name under pytest's importlib mode ("tests.projects...") is taken by
any regular package called ``tests`` on sys.path (a source checkout of detectron2 installed in editable mode has
one). The test puts this folder on sys.path, so the workers import it as ``internet_dist_worker``."""
import torch

from d2_refine.projects.internet.buffer import ClassBuffer


def dist_worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        buf = ClassBuffer(3, 4)
        g = torch.Generator().manual_seed(rank)
        feats = torch.rand(rank + 2, 4, generator=g)
        labels = torch.tensor([0, 2, 2][: rank + 2])
        buf.update(feats, labels)
        torch.save({"feats": feats, "labels": labels, "state": buf.state_dict()}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def critic_worker(rank, init_file, out_file):
    """InterNetCritic with a cross-rank BN (detectron2's naiveSyncBN_N, which runs on the CPU), rank 0 without a RoI
    of the set, then the step's next collective (the class buffer's all-reduce)."""
    import datetime

    import torch.distributed as dist

    from d2_refine.projects.internet.critic import InterNetCritic

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # a rank left waiting fails instead of hanging
    try:
        torch.manual_seed(0)
        critic = InterNetCritic(8, 4, 16, "naiveSyncBN_N", "sigmoid").train()
        x = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(1))
        out = critic(x[:0] if rank == 0 else x)
        marker = torch.full((2,), float(rank + 1))
        dist.all_reduce(marker)
        torch.save({"out": out.detach(), "marker": marker, "state": critic.state_dict(), "x": x},
                   f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()
