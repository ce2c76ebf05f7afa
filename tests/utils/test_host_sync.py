"""HostSyncCounter counts the ops that would make the host wait for a GPU, and only those."""
import torch

from d2_refine.utils.host_sync import HostSyncCounter


def test_counts_data_dependent_sizes_and_value_reads_only():
    x = torch.randn(50)
    mask = x > 0
    with HostSyncCounter() as c:
        torch.nonzero(mask)
        x[mask]  # boolean-mask index
        float(x.sum())
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]))
        torch.unique(x)
        x[:3].tolist()  # no aten op: seen at the Python call
    assert c.counts == {"aten::nonzero": 1, "aten::index": 1, "aten::_local_scalar_dense": 1,
                        "aten::repeat_interleave": 1, "aten::_unique2": 1, "Tensor.tolist": 1}, c.counts
    with HostSyncCounter() as c:
        torch.where(mask, x, 0.0)
        x.masked_fill(~mask, 0.0)
        x[torch.arange(5)]
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]), output_size=6)
        torch.repeat_interleave(torch.arange(3), 2)
        torch.sort(x)
        x.topk(5)
    assert c.total == 0, c.counts
