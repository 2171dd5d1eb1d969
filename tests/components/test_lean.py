"""The lean modules' shared mechanics: which tensors count as the CPU's, and the class swap."""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from zoo.components.lean import runs_on_the_cpu, swap_classes


def test_only_real_cpu_tensors_run_on_the_cpu() -> None:
    real = torch.ones(2)
    assert runs_on_the_cpu(real, real)
    assert not runs_on_the_cpu(real, torch.ones(2, device="meta"))
    fake = FakeTensorMode().from_tensor(real)  # a count's stand-in for a device tensor, on the CPU
    assert fake.device.type == "cpu" and not runs_on_the_cpu(real, fake)


class _Lean(nn.Linear):
    pass


def test_swap_classes_swaps_exact_classes_only_and_keeps_parameters() -> None:
    class Sub(nn.Linear):
        pass

    root = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), Sub(2, 2), nn.ReLU())
    weight = root[0].weight
    before = {k: v.clone() for k, v in root.state_dict().items()}
    assert swap_classes(root, {nn.Linear: _Lean}) == 2
    assert [type(m) for m in (root[0], root[1][0], root[2])] == [_Lean, _Lean, Sub]
    assert root[0].weight is weight
    assert all(torch.equal(v, before[k]) for k, v in root.state_dict().items())
    assert swap_classes(root, {nn.Linear: _Lean}) == 0  # already lean
