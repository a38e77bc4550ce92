"""The device-independent training-memory accounting (`StepMemory`) and `PeakMemory` off the GPU."""
from __future__ import annotations

import torch

from prunetune.train.memory import PeakMemory, StepMemory


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_step_memory_counts_a_saved_frozen_weight_once():
    """A frozen layer after a trainable one: autograd saves its weight to back-propagate into the trainable
    layer. That weight is a parameter, already counted once; the activations are its input and the ReLU output."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    for p in model[2].parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    x = torch.randn(4, 16)
    mem = StepMemory()
    with mem.saving():
        hidden = model[1](model[0](x))
        loss = model[2](hidden).sum()
    loss.backward()
    opt.step()
    mem.record(model, opt)

    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    optim = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    activations = [x, hidden]  # saved by the first Linear (for its weight's gradient) and by the ReLU
    expected = _nbytes(params) + _nbytes(grads) + _nbytes(optim) + _nbytes(activations)
    assert mem.peak_mb * 2**20 == expected


def test_step_memory_keeps_the_peak_over_steps():
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mem = StepMemory()
    for rows in (16, 2):
        with mem.saving():
            loss = model(torch.randn(rows, 8)).sum()
        loss.backward()
        mem.record(model, opt)
        opt.zero_grad(set_to_none=True)
        if rows == 16:
            big = mem.peak_mb
    assert mem.peak_mb == big > _nbytes(list(model.parameters())) * 2 / 2**20


def test_peak_memory_is_none_on_cpu():
    with PeakMemory("cpu") as mem:
        torch.empty(1024)
    assert mem.peak_mb is None and mem.above_entry_mb is None
