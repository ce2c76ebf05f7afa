"""ClassBuffer: running mean, FIFO window, checkpoint state (detectron2-free)."""
import os

import pytest
import torch

from d2_refine.projects.internet.buffer import ClassBuffer


def _steps(seed, num_steps=12, num_classes=5, dim=8):
    g = torch.Generator().manual_seed(seed)
    for _ in range(num_steps):
        n = int(torch.randint(0, 7, (1,), generator=g))
        # class 4 is never seen; some steps are empty
        yield torch.rand(n, dim, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_running_mean_equals_mean_of_all_features_seen(seed):
    buf = ClassBuffer(5, 8, size=1)
    seen_f, seen_y = [], []
    for f, y in _steps(seed):
        buf.update(f, y)
        seen_f.append(f)
        seen_y.append(y)
        allf, ally = torch.cat(seen_f), torch.cat(seen_y)
        for c in range(5):
            m = ally == c
            assert buf.counts[c] == m.sum()
            if m.any():
                torch.testing.assert_close(buf.centroids[c], allf[m].mean(0), rtol=1e-6, atol=1e-6)
            else:
                assert not buf.filled()[c] and buf.centroids[c].abs().sum() == 0
    assert buf.occupancy == int(torch.unique(torch.cat(seen_y)).numel())


def test_fifo_window_is_count_weighted_mean_of_last_updates():
    K = 3
    buf = ClassBuffer(5, 8, size=K)
    history = {c: [] for c in range(5)}  # per class: list of (features) of the updates containing it
    for f, y in _steps(4, num_steps=20):
        buf.update(f, y)
        for c in torch.unique(y).tolist():
            history[c].append(f[y == c])
        for c in range(5):
            if history[c]:
                window = torch.cat(history[c][-K:])
                torch.testing.assert_close(buf.centroids[c], window.mean(0), rtol=1e-6, atol=1e-6)
                assert buf.counts[c] == window.shape[0]
            else:
                assert buf.counts[c] == 0


def test_update_is_detached_and_returns_step_counts():
    buf = ClassBuffer(3, 4)
    f = torch.rand(4, 4, requires_grad=True)
    counts = buf.update(f, torch.tensor([0, 0, 2, 2]))
    assert counts.tolist() == [2, 0, 2]
    assert not buf.centroids.requires_grad and buf.centroids.grad_fn is None
    assert list(buf.parameters()) == []


def test_state_dict_round_trip():
    buf = ClassBuffer(4, 6, size=2)
    for f, y in _steps(7, num_classes=4, dim=6):
        buf.update(f, y)
    sd = buf.state_dict()
    assert {"centroids", "counts", "fifo_sums", "fifo_counts", "fifo_next"} <= set(sd)
    other = ClassBuffer(4, 6, size=2)
    other.load_state_dict(sd)
    for k, v in buf.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)


def test_bad_inputs_raise():
    buf = ClassBuffer(3, 4)
    with pytest.raises(ValueError, match="labels must be in"):
        buf.update(torch.rand(1, 4), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"Tensor\[R, 4\]"):
        buf.update(torch.rand(1, 5), torch.tensor([0]))
    with pytest.raises(ValueError, match="BUFFER_SIZE"):
        ClassBuffer(3, 4, size=0)


def test_distributed_update_all_reduces_sums_and_counts(tmp_path, monkeypatch):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    # the spawned workers unpickle the worker by its module's name: that module's folder goes on sys.path, which
    # they inherit (see internet_dist_worker.py for why it is not in this module)
    monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(__file__)))
    from internet_dist_worker import dist_worker

    mp.spawn(dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"out.{r}") for r in (0, 1))
    allf = torch.cat([r0["feats"], r1["feats"]])
    ally = torch.cat([r0["labels"], r1["labels"]])
    for r in (r0, r1):  # every rank holds the centroids of both ranks' features
        assert r["state"]["counts"].tolist() == [2, 0, 3]
        for c in (0, 2):
            torch.testing.assert_close(r["state"]["centroids"][c], allf[ally == c].mean(0))
