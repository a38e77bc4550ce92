"""Step-time cost model: the predicted fine-tune step time of a pruning plan, relative to the unpruned PEFT model.

It sits between scores/ and plan.py on the data path: the allocator (plan.py, target mode) spends the Taylor
loss estimates of scores/ against the time each unit costs here. Everything per architecture (dims, gated FFN,
GQA groups, fused qkv, which projections exist) comes from the `Arch` descriptor; no module names are used.

Model. A training step is forward + backward + optimizer over `batch` sequences of the task's real padded length.
Each part is counted as analytical work: FLOPs (matmuls), bytes (elementwise passes over activations, weight
reads, optimizer state) and ops (kernel launches / autograd nodes, which dominate small models on CPU), turned
into seconds by `DeviceRates`. Per unit type:

- head unit (one KV group with its q/k/v/o slices and its attention): forward, plus the input-gradient backward
  when its block is at or above the lowest block with a trainable module (the *cut*);
- FFN neuron (its up / gate / down slices and activation): likewise;
- PEFT rank (LoRA rank or adapter unit): forward, weight and input gradients, AdamW state;
- PEFT module: its per-module overhead (dropout / scale / add passes, launches, optimizer tensors) plus its ranks;
  removing it may also raise the cut, which skips the whole backward below: the saving is not additive, which
  is why the allocator enumerates the cut explicitly.

Frozen base weights get no weight gradients; below the cut there is no backward at all (nothing trainable
below needs an input gradient). The block at the cut is counted as fully back-propagated (at most one block
over-estimated). Embeddings, the task head and the loss are a constant `rest` term.
The rates are defaults per device type (CPU: fitted to measured step times of 12 plans on a 2-core machine by
`benchmarks/cost_fit.py`; CUDA: order-of-magnitude); only their ratios matter for a speedup, and the optional
probe (`calibrate`) fits the compute-vs-overhead split on the actual device.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from .arch import Arch

_FFN_ROLES = ("up", "gate", "down")


@dataclass(frozen=True)
class Work:
    flops: float = 0.0
    bytes: float = 0.0
    ops: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.bytes + other.bytes, self.ops + other.ops)

    def __mul__(self, k: float) -> "Work":
        return Work(self.flops * k, self.bytes * k, self.ops * k)

    __rmul__ = __mul__


@dataclass(frozen=True)
class DeviceRates:
    flops_per_s: float
    bytes_per_s: float
    op_seconds: float
    optimizer_ops_per_tensor: float  # AdamW is a per-tensor loop on CPU, a fused foreach kernel on CUDA
    source: str = "default"

    def seconds(self, w: Work) -> float:
        return w.flops / self.flops_per_s + w.bytes / self.bytes_per_s + w.ops * self.op_seconds

    @classmethod
    def for_device(cls, device_type: str) -> "DeviceRates":
        if device_type == "cuda":
            return cls(4e13, 2e12, 8e-6, 1.0, "default-cuda")
        # fitted (benchmarks/cost_fit.py: 12 measured plans of MiniLM SST-2 on a 2-core x86 CPU, both sides timed
        # on the same batches; leave-one-out error 4.6% mean, 11% worst); the first fit (1.92e11, 7.7e9, 7.4e-5)
        # timed the two sides on different batches, the order-of-magnitude guess was (6e10, 8e9, 1.5e-5)
        return cls(1.45e11, 1.55e10, 7.6e-5, 10.0, "fitted-cpu")


@dataclass(frozen=True)
class SeqStats:
    """The batch shape of one optimizer step: `batch` sequences in micro-batches padded to their longest row."""

    batch: int  # sequences per optimizer step (batch_size x grad_accum)
    length: float  # mean padded length of a micro-batch
    length_sq: float  # mean squared padded length (attention scores scale with L^2)

    @property
    def tokens(self) -> float:
        return self.batch * self.length

    @property
    def pairs(self) -> float:
        return self.batch * self.length_sq


def seq_stats(lengths: list[int], batch_size: int, grad_accum: int = 1, seed: int = 0, draws: int = 256) -> SeqStats:
    """Expected padded length (and its square) of random micro-batches of the task's real token lengths."""
    if not lengths:
        return SeqStats(batch_size * grad_accum, 1.0, 1.0)
    rng = random.Random(seed)  # seeded: the same data gives the same prediction (plans are deterministic)
    k = min(batch_size, len(lengths))
    maxima = [max(rng.sample(lengths, k)) for _ in range(draws)]
    mean = sum(maxima) / draws
    return SeqStats(batch_size * grad_accum, mean, sum(m * m for m in maxima) / draws)


@dataclass
class StepTime:
    """Predicted seconds of one optimizer step, by where the time goes."""

    seconds: float
    attention: float  # head-unit work (q/k/v/o slices + attention), forward and backward
    ffn: float  # neuron work
    peft: float  # PEFT modules and ranks, with their optimizer work
    fixed: float  # norms, residuals, embeddings, task head: not prunable
    backward_skipped: float  # backward not run below the cut (already excluded from the other figures)
    cut_block: int  # lowest block (2*layer, +1 for the FFN half) with a trainable module; 2*layers = none


@dataclass
class Prediction:
    unpruned: StepTime
    pruned: StepTime
    speedup: float
    rates: str
    rate_values: dict | None = None  # the DeviceRates behind it (fitted values, for reports)

    def to_dict(self) -> dict:
        return {"speedup": self.speedup, "rates": self.rates, "rate_values": self.rate_values,
                "unpruned": asdict(self.unpruned), "pruned": asdict(self.pruned)}


class CostModel:
    """Analytical step cost of a (pruned) PEFT model. peft_ranks: module -> rank (adapter size) unpruned."""

    def __init__(self, arch: Arch, seq: SeqStats, peft_ranks: dict[str, int], rates: DeviceRates | None = None,
                 peft_kind: str = "lora", act_bytes: int = 4, weight_bytes: int = 4):
        self.arch, self.seq, self.peft_kind = arch, seq, peft_kind
        self.rates = rates or DeviceRates.for_device("cpu")
        self.peft_ranks = dict(peft_ranks)
        self.ab, self.wb = act_bytes, weight_bytes
        self._roles = {name: arch.role_of(name) for name in self.peft_ranks}

    # ---- structure -----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return 2 * self.arch.num_layers

    def block_of(self, module: str) -> int:
        layer, role = self._roles[module]
        return 2 * layer + (1 if role in _FFN_ROLES else 0)

    def cut_of(self, modules) -> int:
        return min((self.block_of(m) for m in modules), default=self.num_blocks)

    # ---- per-unit work ---------------------------------------------------------------------------
    def head_work(self, backward: bool, at_cut: bool = False) -> Work:
        """One head unit: g query heads sharing one KV head of head_dim d. at_cut: the block is the lowest
        one back-propagated, so its input projections (q, k, v) need no input gradient."""
        a, s = self.arch, self.seq
        g, d, h = a.heads_per_unit, a.head_dim, a.hidden_size
        weights = h * d * (2 * g + 2)  # q (g*d out), k and v (d out), o (g*d in)
        fwd = Work(2 * s.tokens * weights + 4 * s.pairs * d * g,
                   weights * self.wb + (s.tokens * d * (2 * g + 2) + 6 * s.pairs * g) * self.ab)
        if not backward:
            return fwd
        # input gradients only (frozen weights): linears cost their forward again; both attention operands need one
        grad_weights = weights - (h * d * (g + 2) if at_cut else 0)
        bwd = Work(2 * s.tokens * grad_weights + 8 * s.pairs * d * g,
                   grad_weights * self.wb + (2 * s.tokens * d * (2 * g + 2) + 8 * s.pairs * g) * self.ab)
        return fwd + bwd

    def neuron_work(self, backward: bool, at_cut: bool = False) -> Work:
        a, n = self.arch, self.seq.tokens
        mats = 3 if a.gated_ffn else 2
        fwd = Work(2 * n * a.hidden_size * mats,
                   a.hidden_size * mats * self.wb + n * (8 if a.gated_ffn else 4) * self.ab)
        if not backward:
            return fwd
        grad_mats = 1 if at_cut else mats  # at the cut only down's input gradient is needed
        return fwd + Work(2 * n * a.hidden_size * grad_mats,
                          a.hidden_size * grad_mats * self.wb + n * (10 if a.gated_ffn else 6) * self.ab)

    def _unit_work(self, half: int, block: int, cut: int) -> Work:
        fn = self.head_work if half == 0 else self.neuron_work
        return fn(block >= cut, block == cut)

    def _module_dims(self, module: str, units: int | None = None, neurons: int | None = None) -> tuple[int, int]:
        if self.peft_kind == "adapter":  # serial bottleneck adapters: hidden -> units -> hidden
            return self.arch.hidden_size, self.arch.hidden_size
        return self.arch.role_dims(self._roles[module][1], units, neurons)

    def _at_block_input(self, module: str) -> bool:
        """LoRA on a projection that reads the block input (q, k, v, up, gate); adapters sit on outputs."""
        return self.peft_kind == "lora" and self._roles[module][1] in ("q", "k", "v", "up", "gate")

    def rank_work(self, module: str, units: int | None = None, neurons: int | None = None,
                  optimizer: bool = True, cut: int = 0) -> Work:
        """One LoRA rank (row of A, column of B) or adapter unit: forward 2n(i+o), backward grads of B, of
        A's output, of A (2n(o+o+i)) and of the input (2ni: not needed on a block-input module at the cut)."""
        i, o = self._module_dims(module, units, neurons)
        n, p = self.seq.tokens, i + o
        input_grad = 0 if self.block_of(module) == cut and self._at_block_input(module) else 2 * n * i
        w = Work(2 * n * p + 4 * n * o + 2 * n * i + input_grad, 3 * p * self.wb + 4 * n * self.ab)
        return w + Work(0, 28 * p) if optimizer else w  # AdamW: read p, g, m, v; write p, m, v (fp32 state)

    def module_work(self, module: str, units: int | None = None, neurons: int | None = None,
                    optimizer: bool = True) -> Work:
        """Per-module overhead besides its ranks: dropout on the input, scale and add on the output, launches."""
        i, o = self._module_dims(module, units, neurons)
        w = Work(0, 2.5 * self.seq.tokens * (3 * i + 6 * o) * self.ab, 13)
        return w + Work(0, 0, 2 * (self.rates.optimizer_ops_per_tensor + 2)) if optimizer else w

    def block_fixed_work(self, ffn: bool, backward: bool) -> Work:
        """Norm, residual, dropout and reshapes of one block half: independent of heads / neurons kept."""
        n, h = self.seq.tokens, self.arch.hidden_size
        fwd = Work(0, n * h * (8 if ffn else 10) * self.ab, 6 if ffn else 12)
        return fwd + Work(0, n * h * (12 if ffn else 14) * self.ab, 9 if ffn else 18) if backward else fwd

    def rest_work(self) -> Work:
        """Embeddings, task head, loss (the head always trains; embeddings are frozen)."""
        return Work(0, self.seq.tokens * self.arch.hidden_size * 8 * self.ab, 30)

    # ---- whole step ------------------------------------------------------------------------------
    def step_time(self, heads: list[int], neurons: list[int], ranks: dict[str, int],
                  optimizer: bool = True) -> StepTime:
        """Seconds of one step with heads[l] head units and neurons[l] neurons kept per layer and ranks[m] > 0
        ranks kept per PEFT module (absent / 0 = module removed)."""
        sec = self.rates.seconds
        live = {m: r for m, r in ranks.items() if r > 0}
        cut = self.cut_of(live)
        attention = ffn = skipped = 0.0
        fixed = sec(self.rest_work())
        for layer in range(self.arch.num_layers):
            for half, count in ((0, heads[layer]), (1, neurons[layer])):
                block = 2 * layer + half
                t = count * sec(self._unit_work(half, block, cut))
                attention, ffn = (attention + t, ffn) if half == 0 else (attention, ffn + t)
                fixed += sec(self.block_fixed_work(half == 1, block >= cut))
                if block < cut:  # what back-propagating this block would have cost
                    skipped += count * (sec(self._unit_work(half, block, 0)) - sec(self._unit_work(half, block, cut))) \
                        + sec(self.block_fixed_work(half == 1, True)) - sec(self.block_fixed_work(half == 1, False))
        peft = 0.0
        for m, r in live.items():
            layer = self._roles[m][0]
            peft += r * sec(self.rank_work(m, heads[layer], neurons[layer], optimizer, cut)) + \
                sec(self.module_work(m, heads[layer], neurons[layer], optimizer))
        return StepTime(attention + ffn + peft + fixed, attention, ffn, peft, fixed, skipped, cut)

    def unpruned(self, optimizer: bool = True) -> StepTime:
        a = self.arch
        return self.step_time([a.num_units] * a.num_layers, [a.intermediate_size] * a.num_layers, self.peft_ranks,
                              optimizer)

    def predict(self, plan) -> Prediction:
        """Predicted step time of a plan against the unpruned PEFT model (all modules at full rank)."""
        pruned = self.step_time([len(k) for k in plan.kept_heads], [len(k) for k in plan.kept_neurons],
                                {m: len(r) for m, r in plan.peft_ranks.items()})
        base = self.unpruned()
        return Prediction(base, pruned, base.seconds / pruned.seconds, self.rates.source, asdict(self.rates))

    # ---- parameters (for prune.target_params) ----------------------------------------------------------
    def head_params(self) -> int:
        a = self.arch
        return a.hidden_size * a.head_dim * (2 * a.heads_per_unit + 2)

    def neuron_params(self) -> int:
        return self.arch.hidden_size * (3 if self.arch.gated_ffn else 2)


def calibrate(model: CostModel, measure, fractions: tuple[float, float] = (1.0, 0.25)) -> DeviceRates:
    """Fit the rates to timings of the unpruned model's forward + backward (no optimizer step).

    measure(batch) -> (seconds, padded length) of one pass over `batch` training rows. Two batch sizes separate
    the work that scales with the batch (FLOPs and activation bytes) from the fixed per-op overhead; the split
    of FLOPs against bytes inside the scaling part keeps the default ratio (two timings cannot identify it)."""
    sizes = sorted({max(1, round(model.seq.batch * f)) for f in fractions}, reverse=True)
    if len(sizes) < 2:
        return model.rates
    r = model.rates
    compute, times, ops = [], [], 0.0
    for b in sizes:
        seconds, length = measure(b)
        seq = SeqStats(b, length, length * length)
        compute.append(CostModel(model.arch, seq, model.peft_ranks, DeviceRates(r.flops_per_s, r.bytes_per_s, 0.0, 0.0),
                                 model.peft_kind, model.ab, model.wb).unpruned(optimizer=False).seconds)
        # the op count alone (rates of one second per op, free compute): the same for every batch size
        ops = CostModel(model.arch, seq, model.peft_ranks, DeviceRates(1e300, 1e300, 1.0, 0.0), model.peft_kind,
                        model.ab, model.wb).unpruned(optimizer=False).seconds
        times.append(float(seconds))
    scale = (times[0] - times[1]) / max(compute[0] - compute[1], 1e-30)  # measured / modelled compute seconds
    op_seconds = (times[0] - scale * compute[0]) / max(ops, 1.0)
    if scale > 0 and op_seconds >= 0:
        return DeviceRates(r.flops_per_s / scale, r.bytes_per_s / scale, op_seconds, r.optimizer_ops_per_tensor,
                           "probe")
    # timings the two-term model cannot explain (seen on a 2-core CPU: SmolLM2's pass at 8 rows took 4.4x its pass
    # at 2, more than the batch ratio, so the fixed overhead would be negative): keep the default split and match
    # the measured time. One factor on every rate leaves every predicted ratio, hence the plan, as the defaults
    # make them; the source says so, so a report does not claim a calibration that changed nothing.
    scale = times[0] / (compute[0] + ops * r.op_seconds)
    return DeviceRates(r.flops_per_s / scale, r.bytes_per_s / scale, r.op_seconds * scale,
                       r.optimizer_ops_per_tensor, "probe-uniform")
