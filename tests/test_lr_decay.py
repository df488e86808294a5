"""The learning-rate schedule: linear warm-up, then constant (the reference) or linear decay to a floor."""
from __future__ import annotations

import pytest
import torch

from r3_rl.config import Learner
from r3_rl.learner.optim import TorchOptim, warmup_lambda


def test_schedule_shapes() -> None:
    const = warmup_lambda(4)
    assert [const(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # the reference: warm-up, then flat
    decay = warmup_lambda(0, 4, 0.2)
    assert [decay(s) for s in range(6)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.2, 0.2])
    both = warmup_lambda(2, 6, 0.0)
    assert [both(s) for s in range(8)] == pytest.approx([0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0])


def test_torch_optim_follows_the_schedule() -> None:
    model = torch.nn.Linear(2, 1)
    opt = TorchOptim([model], Learner(lr=1.0e-2, lr_decay_steps=3, lr_final=0.5))
    seen = []
    for _ in range(4):
        seen.append(opt.lr())
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert seen == pytest.approx([1.0e-2 * (1 - 0.5 / 3), 1.0e-2 * (1 - 1 / 3), 0.5e-2, 0.5e-2])
