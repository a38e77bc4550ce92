"""Light-PEFT importance of PEFT modules (norm ratio) and of their ranks (first-order Taylor).

Scores are summed on device during the accumulation window and turned into means (all-reduced under DDP)
by `finalize()`. Tracking is switched on only inside the window and removed afterwards, so fine-tuning pays
nothing for it.

What a window step contributes is decided per optimizer step: forward statistics are only taken from
training forwards (grad enabled, model in train mode: never a dev evaluation), held as pending until
`after_backward`, and committed together with the gradient statistics only when the step's gradients are
finite; a step the fp16 GradScaler skips adds nothing, neither to the sums nor to the step counts.
"""
from __future__ import annotations

import torch

from ..units.adapters import AdapterSet
from ..units.lora import ADAPTER, lora_layers
from ..dist import all_reduce_sum_, rank, world_size

RANK_SCORES = {}


def rank_score(name):
    def deco(fn):
        RANK_SCORES[name] = fn
        return fn

    return deco


@rank_score("taylor")
def taylor(a, ga, b, gb) -> torch.Tensor:
    """S_i = sum_o B[o,i] dL/dB[o,i]: the first-order loss change of removing rank i (signed, per step)."""
    return (b * gb).sum(0)


@rank_score("reference")
def reference(a, ga, b, gb) -> torch.Tensor:
    """The reference code's |mean(A*gA)| + |mean(B*gB)| per rank (shape dependent; kept as an option)."""
    return (a * ga).mean(1).abs() + (b * gb).mean(0).abs()


def norm_ratio(delta: torch.Tensor, base: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over non-padding tokens of ||delta||_2 / ||base||_2."""
    ratio = delta.detach().float().norm(dim=-1) / base.detach().float().norm(dim=-1).clamp_min(1e-12)
    return masked_mean(ratio, token_mask)


class ImportanceTracker:
    """Accumulates module and rank importance for the LoRA layers (or adapters) of a model."""

    def __init__(self, hf_model, adapters: AdapterSet | None = None, rank_score: str = "taylor",
                 groups: dict[str, list[str]] | None = None, spans: dict[str, tuple[int, int]] | None = None):
        """groups: unit name -> the LoRA modules / adapter positions it consists of (PrunePEFT units);
        when given, gradient statistics per unit are accumulated too (see `unit_stats`). spans: unit name ->
        the [lo, hi) ranks (adapter bottleneck units) of its positions it owns (rank-granular search); a unit
        without a span owns its positions whole."""
        self.hf_model = hf_model
        self.adapters = adapters
        self.rank_fn = RANK_SCORES[rank_score]
        self.groups = groups or {}
        self.spans = spans or {}
        # position -> [(statistics key, lo, hi)] for the rank chunks that units own there
        self._chunks: dict[str, list[tuple[str, int, int]]] = {}
        for unit, (lo, hi) in sorted(self.spans.items()):
            for pos in self.groups.get(unit, []):
                self._chunks.setdefault(pos, []).append((chunk_key(pos, lo), lo, hi))
        self.act_sum: dict[str, torch.Tensor] = {}
        self.grad_sum: dict[str, torch.Tensor] = {}
        self.taylor_sum: dict[str, torch.Tensor] = {}
        self._lora = None  # module name -> LoRA layer, looked up once
        self.token_mask: torch.Tensor | None = None
        self.module_sum: dict[str, dict[int, torch.Tensor]] = {}  # module -> step -> [sum of ratios, tokens]
        self.module_n: dict[str, int] = {}
        self.rank_sum: dict[str, torch.Tensor] = {}
        self.module_taylor_sum: dict[str, torch.Tensor] = {}
        self.rank_n = 0
        # path importance (`accumulate_path`): per module / rank, the loss decrease its own updates bought so far
        self.path_module_sum: dict[str, torch.Tensor] = {}
        self.path_rank_sum: dict[str, torch.Tensor] = {}
        self.path_steps = 0
        self._path_pending: dict[str, list[torch.Tensor]] = {}  # module -> [params, grads] of the step in flight
        self.skipped = 0  # window steps dropped because their gradients / statistics were not finite
        self._handles: list = []
        self._base_out: dict[str, torch.Tensor] = {}
        # forward statistics of the step in progress: module -> per forward (stack[sum of ratios, tokens],
        # activation or None), committed or dropped by after_backward
        self._pending: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}

    # -- module importance (forward hooks) --------------------------------------------------------
    def start(self) -> "ImportanceTracker":
        self.stop()
        if self.adapters is not None:
            for name in self.adapters.names():
                self.adapters.get(name).observer = lambda d, h, z, n=name: self._add_adapter(n, d, h, z)
        for name, layer in lora_layers(self.hf_model).items():
            self._handles.append(layer.base_layer.register_forward_hook(
                lambda _m, _i, out, n=name: self._base_out.__setitem__(n, out.detach()) if self._recording() else None))
            self._handles.append(layer.lora_B[ADAPTER].register_forward_hook(
                lambda m, inp, out, n=name, l=layer: self._add_lora(n, out * l.scaling[ADAPTER], inp[0], m.weight,
                                                                    l.scaling[ADAPTER])))
        return self

    def _recording(self) -> bool:
        """Only training forwards are statistics of the window: evaluation runs the model in eval mode
        under no_grad (`train.evaluate`), and must leave the scores exactly as they are."""
        return torch.is_grad_enabled() and self.hf_model.training

    def _add_lora(self, name: str, delta: torch.Tensor, hidden: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        base = self._base_out.pop(name, None)
        if base is None:  # not a recorded (training) forward
            return
        self._add_module(name, delta, base)
        # a rank chunk's own output: B[:, lo:hi] (A x)[lo:hi] (detached operands: no graph; not under no_grad,
        # which _add_module reads as "not a training forward")
        for key, lo, hi in self._chunks.get(name, []):
            self._add_module(key, hidden[..., lo:hi].detach() @ b[:, lo:hi].detach().T * scaling, base)

    def _add_adapter(self, name: str, delta: torch.Tensor, base: torch.Tensor, hidden: torch.Tensor) -> None:
        self._add_module(name, delta, base)
        if name in self._chunks and self._recording():
            up = self.adapters.get(name).up.weight.detach()
            for key, lo, hi in self._chunks[name]:  # a chunk of bottleneck units: up[:, lo:hi] z[lo:hi] (no bias)
                self._add_module(key, hidden[..., lo:hi].detach() @ up[:, lo:hi].T, base)

    def stop(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._base_out.clear()
        if self.adapters is not None:
            for name in self.adapters.names():
                self.adapters.get(name).observer = None

    def _add_module(self, name: str, delta: torch.Tensor, base: torch.Tensor) -> None:
        if not self._recording():
            return
        with torch.no_grad():
            # per optimizer step: sum of per-token ratios and token count, so that the step mean (and its
            # all-reduce under DDP) equals the single-process mean over the same global batch
            ratio = delta.detach().float().norm(dim=-1) / base.detach().float().norm(dim=-1).clamp_min(1e-12)
            m = token_weights(ratio, self.token_mask)
            acc = torch.stack([(ratio * m).sum(), m.sum()])
            act = None
            if self.groups:  # activation criterion: mean |unit output| over non-padding tokens
                act = masked_mean(delta.detach().float().abs().mean(-1), self.token_mask)
            self._pending.setdefault(name, []).append((acc, act))

    # -- rank importance (after backward, before the optimizer step) --------------------------------
    @torch.no_grad()
    def after_backward(self, finite: bool = True) -> None:
        """Call once per optimizer step, on unscaled, fully accumulated gradients. finite=False (the
        training loop found inf/NaN gradients: the GradScaler skips this step) drops the step entirely;
        so does any non-finite statistic of the step."""
        pending, self._pending = self._pending, {}
        if not finite:
            self.skipped += 1
            return
        ranks, module_taylor, grads, taylors = {}, {}, {}, {}
        for name, a, ga, b, gb in self._rank_tensors():
            ranks[name] = self.rank_fn(a, ga, b, gb).abs()
            # whole module: |sum_i S_i|, the first-order loss change of removing every rank at once
            module_taylor[name] = (b * gb).sum().abs()
        for unit, positions in self.groups.items():
            span = self.spans.get(unit)
            pairs = [pg for pos in positions for pg in self._slices(pos, span, output=False)]
            if not pairs:
                continue
            n = sum(p.numel() for p, _ in pairs)
            grads[unit] = sum(g.abs().sum() for _, g in pairs) / n
            # removal effect: first-order loss change of zeroing the unit's output side (LoRA B, an adapter's up
            # projection). Summing w*g over all parameters counted LoRA twice (sum A*gA = sum B*gB exactly) and
            # added an adapter's down projection, which removing the adapter does not scale.
            out = [pg for pos in positions for pg in self._slices(pos, span, output=True)]
            taylors[unit] = sum((p * g).sum() for p, g in out).abs() if out else pairs[0][1].new_zeros(())
        parts = [t for d in (ranks, module_taylor, grads, taylors) for t in d.values()]
        parts += [t for forwards in pending.values() for acc, act in forwards for t in (acc, act) if t is not None]
        if not _all_finite(parts, self._device()):
            self.skipped += 1
            return
        for name, forwards in pending.items():
            steps = self.module_sum.setdefault(name, {})
            for acc, act in forwards:
                steps[self.rank_n] = steps[self.rank_n] + acc if self.rank_n in steps else acc
                self.module_n[name] = self.module_n.get(name, 0) + 1
                if act is not None:
                    self.act_sum[name] = self.act_sum.get(name, 0.0) + act
        for name, s in ranks.items():
            self.rank_sum[name] = self.rank_sum.get(name, 0.0) + s
            self.module_taylor_sum[name] = self.module_taylor_sum.get(name, 0.0) + module_taylor[name]
        for unit in grads:
            self.grad_sum[unit] = self.grad_sum.get(unit, 0.0) + grads[unit]
            self.taylor_sum[unit] = self.taylor_sum.get(unit, 0.0) + taylors[unit]
        self.rank_n += 1

    # -- path importance (every estimation step, from step 0) ----------------------------------------
    @torch.no_grad()
    def accumulate_path(self, finite: bool = True) -> None:
        """Call once per optimizer step with its unclipped gradients (before the update), from the first step.

        A PEFT module starts at zero (LoRA B = 0, adapter up = 0), so the point Taylor term B*dL/dB says removing
        it is free until it has trained: it measures the slope where the module is now, not what it has bought.
        The path integral (Zenke et al. 2017, "synaptic intelligence") sums, over the steps so far,
        -g_t . (theta_{t+1} - theta_t) for the module's own parameters: the first-order loss decrease its updates
        produced, i.e. the loss its removal gives back. Per rank i the same sum over row i of A and column i of B
        (an adapter's unit i: row i of down, its bias, column i of up). The update of step t is only known at the
        next call (or `settle_path`), so this first settles the previous step, then records this one."""
        self.settle_path()
        if not finite:  # the scaler skips this step: no update, nothing to attribute
            return
        for name, params in self._path_params():
            if all(p.grad is not None for p in params):
                self._path_pending[name] = [t for p in params for t in (p.detach().clone(), p.grad.detach().float().clone())]

    @torch.no_grad()
    def settle_path(self) -> None:
        """Attribute the update of the step recorded last (the optimizer has applied it since)."""
        if not self._path_pending:
            return
        parts = {}
        for name, params in self._path_params():
            pending = self._path_pending.get(name)
            if pending is None:
                continue
            contrib = [-(g * (p.detach().float() - p0.float())) for p, p0, g in zip(params, pending[0::2], pending[1::2])]
            parts[name] = (self._per_rank(name, contrib), sum(c.sum() for c in contrib))
        self._path_pending = {}
        if not _all_finite([t for pair in parts.values() for t in pair], self._device()):
            return
        for name, (ranks, total) in parts.items():
            self.path_rank_sum[name] = self.path_rank_sum.get(name, 0.0) + ranks
            self.path_module_sum[name] = self.path_module_sum.get(name, 0.0) + total
        self.path_steps += 1

    def _path_params(self):
        """(module, its parameters in `_params` order): LoRA [A, B]; adapters [down.w, down.b, up.w, up.b]."""
        for name in [*(self.adapters.names() if self.adapters is not None else []), *self._lora_layers()]:
            yield name, self._params(name)

    def _per_rank(self, name: str, contrib: list[torch.Tensor]) -> torch.Tensor:
        """A module's per-parameter contributions summed per rank (adapter unit); an adapter's up bias is
        module-wide and only counts for the whole module."""
        if len(contrib) == 2:  # LoRA: A is [r, in], B is [out, r]
            return contrib[0].sum(1) + contrib[1].sum(0)
        down_w, down_b, up_w, _up_b = contrib  # adapter: down [size, hidden], up [hidden, size]
        return down_w.sum(1) + down_b + up_w.sum(0)

    def path_scores(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """(module, rank) path importance: the loss decrease bought so far, clamped at 0 (a unit whose updates
        did not lower the loss on balance is worth nothing to keep). Identical on every DDP rank: it is built from
        the all-reduced gradients and the replicated parameters."""
        self.settle_path()
        modules = {n: max(0.0, float(v)) for n, v in sorted(self.path_module_sum.items())}
        ranks = {n: v.detach().float().cpu().clamp_min(0.0) for n, v in sorted(self.path_rank_sum.items())}
        return modules, ranks

    def _device(self) -> torch.device:
        """Where the live PEFT parameters are (the sums are kept there)."""
        for module in (self.adapters, self.hf_model):
            if module is not None:
                for p in module.parameters():
                    return p.device
        return torch.device("cpu")

    def _slices(self, position: str, span: tuple[int, int] | None, output: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weights, gradients) a unit owns at a position: whole parameters, or with a span the rank rows /
        columns of it (LoRA A[lo:hi], B[:, lo:hi]; adapter down rows and bias, up columns). output: only the
        side whose zeroing removes the unit (LoRA B, adapter up; a chunk does not own the shared up bias)."""
        params = self._output_params(position) if output else self._params(position)
        if span is None:
            return [(p, p.grad) for p in params if p.grad is not None]
        lo, hi = span
        if self.adapters is not None and position in self.adapters.names():
            ad = self.adapters.get(position)
            rows, cols = [ad.down.weight, ad.down.bias], [ad.up.weight]
        else:
            layer = self._lora_layers()[position]
            rows, cols = [layer.lora_A[ADAPTER].weight], [layer.lora_B[ADAPTER].weight]
        out = [(p[lo:hi], p.grad[lo:hi]) for p in rows if not output and p.grad is not None]
        return out + [(p[:, lo:hi], p.grad[:, lo:hi]) for p in cols if p.grad is not None]

    def _lora_layers(self) -> dict:
        """The model's LoRA layers by name, looked up once (the tracker lives within one model shape)."""
        if self._lora is None:
            self._lora = lora_layers(self.hf_model)
        return self._lora

    def _params(self, position: str) -> list[torch.nn.Parameter]:
        if self.adapters is not None and position in self.adapters.names():
            return list(self.adapters.get(position).parameters())
        layer = self._lora_layers().get(position)
        return [] if layer is None else [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]

    def _output_params(self, position: str) -> list[torch.nn.Parameter]:
        """The parameters that scale a unit's output to zero when zeroed: LoRA B, an adapter's up projection."""
        if self.adapters is not None and position in self.adapters.names():
            up = self.adapters.get(position).up
            return [up.weight, up.bias]
        layer = self._lora_layers().get(position)
        return [] if layer is None else [layer.lora_B[ADAPTER].weight]

    def peft_ranks(self) -> dict[str, int]:
        """Every trainable PEFT module this tracker scores and its rank (bottleneck width for adapters): what
        the cost model needs before any step has run."""
        out = {}
        if self.adapters is not None:
            out.update({name: int(self.adapters.get(name).down.weight.shape[0]) for name in self.adapters.names()})
        for name, layer in lora_layers(self.hf_model).items():
            a = layer.lora_A[ADAPTER].weight
            if a.requires_grad:
                out[name] = int(a.shape[0])
        return out

    def _rank_tensors(self):
        if self.adapters is not None:
            for name in self.adapters.names():
                ad = self.adapters.get(name)
                if ad.up.weight.grad is not None:
                    # adapter unit i: the up-projection column i (the down row plays A's part)
                    yield name, ad.down.weight, ad.down.weight.grad, ad.up.weight, ad.up.weight.grad
        for name, layer in lora_layers(self.hf_model).items():
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            if b.grad is not None and a.grad is not None:
                yield name, a, a.grad, b, b.grad

    # -- checkpoints -----------------------------------------------------------------------------
    STATE_KEYS = ("module_sum", "module_n", "rank_sum", "rank_n", "act_sum", "grad_sum", "taylor_sum",
                  "module_taylor_sum", "skipped", "path_module_sum", "path_rank_sum", "path_steps", "_path_pending")

    def state_dict(self) -> dict:
        """Nested dicts of CPU tensors and plain values; step keys as strings (a JSON-backed checkpoint
        keeps them as they are). Under DDP only rank 0 writes the checkpoint, so the per-rank statistics are
        summed over the ranks here (a collective: every rank calls it) and load_state_dict gives them to rank 0."""
        state = {k: _to(getattr(self, k), "cpu") for k in self.STATE_KEYS}
        # module_sum, act_sum, module_n: each rank's own batches (activations); the rest come from gradients,
        # which DDP already averaged
        if world_size() > 1:
            state["module_sum"] = {n: {k: all_reduce_sum_(v.clone()) for k, v in sorted(steps.items())}
                                   for n, steps in sorted(state["module_sum"].items())}
            state["act_sum"] = {n: all_reduce_sum_(torch.as_tensor(v, dtype=torch.float32).clone())
                                for n, v in sorted(state["act_sum"].items())}
            state["module_n"] = {n: int(all_reduce_sum_(torch.tensor(float(v))))
                                 for n, v in sorted(state["module_n"].items())}
        state["module_sum"] = {n: {str(k): v for k, v in steps.items()} for n, steps in state["module_sum"].items()}
        return state

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        """Restore the window's sums onto `device` (default: where the live PEFT parameters are now;
        checkpoints load on the CPU, and a resumed GPU run must keep adding GPU tensors to them)."""
        device = torch.device(device) if device is not None else self._device()
        for k in self.STATE_KEYS:
            if k in state:
                setattr(self, k, _to(state[k], device))
        self.module_sum = {n: {int(k): v for k, v in steps.items()} for n, steps in self.module_sum.items()}
        if rank() != 0:  # the saved per-rank statistics hold every rank's batches: rank 0 carries them on
            self.module_sum = {n: {k: torch.zeros_like(v) for k, v in steps.items()} for n, steps in self.module_sum.items()}
            self.act_sum = {n: torch.zeros_like(torch.as_tensor(v)) for n, v in self.act_sum.items()}
            self.module_n = {n: 0 for n in self.module_n}
        self._pending = {}

    # -- results ---------------------------------------------------------------------------------
    def finalize(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """(module importance, rank importance): means over window steps, summed across DDP ranks."""
        modules = {}
        for name in sorted(self.module_sum):
            per_step = all_reduce_sum_(torch.stack([v for _k, v in sorted(self.module_sum[name].items())]))
            modules[name] = float((per_step[:, 0] / per_step[:, 1].clamp_min(1)).mean())
        ranks = {}
        for name in sorted(self.rank_sum):
            t = self.rank_sum[name].float().clone()
            all_reduce_sum_(t)  # gradients are already averaged by DDP; summing then / world keeps the mean
            ranks[name] = (t / max(self.rank_n, 1) / world_size()).cpu()
        return modules, ranks

    def module_taylor(self) -> dict[str, float]:
        """Per PEFT module: mean over window steps of |sum_o,i B[o,i] dL/dB[o,i]| (adapters: the up projection)."""
        steps = max(self.rank_n, 1) * world_size()
        return {n: _reduced_over(v, steps) for n, v in sorted(self.module_taylor_sum.items())}

    def unit_stats(self) -> dict[str, dict[str, float]]:
        """Per unit (group): norm_ratio and activation (means over forwards, averaged over the unit's
        positions), gradient (mean over steps of mean |g|) and taylor (mean over steps of |sum w*g|)."""
        modules, _ = self.finalize()
        act = {n: _mean_reduced(v, self.module_n[n]) for n, v in self.act_sum.items()}
        steps = max(self.rank_n, 1) * world_size()
        out: dict[str, dict[str, float]] = {"norm_ratio": {}, "activation": {}, "gradient": {}, "taylor": {}}
        for unit, positions in self.groups.items():
            span = self.spans.get(unit)
            keys = [p if span is None else chunk_key(p, span[0]) for p in positions]
            out["norm_ratio"][unit] = _avg([modules.get(k) for k in keys])
            out["activation"][unit] = _avg([act.get(k) for k in keys])
            for key, acc in (("gradient", self.grad_sum), ("taylor", self.taylor_sum)):
                out[key][unit] = _reduced_over(acc.get(unit, 0.0), steps)
        return out


def chunk_key(position: str, lo: int) -> str:
    """Statistics key of the rank chunk starting at `lo` of a position (never a module name: contains '#')."""
    return f"{position}#{lo}"


def _all_finite(tensors: list[torch.Tensor], device: torch.device) -> bool:
    """One sync: every value finite here, and (under DDP) on every rank, so that all ranks keep or drop the
    same steps (finalize all-reduces per-step statistics)."""
    bad = torch.zeros((), device=device)
    if tensors:
        bad = torch.stack([(~torch.isfinite(t.detach())).any() for t in tensors]).any().float().to(device)
    return float(all_reduce_sum_(bad)) == 0


def _to(obj, device):
    """Copy of a nested dict / list of tensors and plain values, tensors on `device`."""
    if torch.is_tensor(obj):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def token_weights(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """1 for real tokens, 0 for padding; all ones when the mask does not fit. OPT runs its FFN on flattened
    (batch*seq, hidden) tokens: same tokens, row-major, so the mask is reshaped."""
    if token_mask is not None and token_mask.numel() == values.numel():
        return token_mask.reshape(values.shape).to(values.device, values.dtype)
    return torch.ones_like(values)


def masked_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    m = token_weights(values, token_mask)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def _mean_reduced(total, count: int) -> float:
    t = torch.stack([torch.as_tensor(total, dtype=torch.float32).cpu(), torch.tensor(float(count))])
    all_reduce_sum_(t)
    return float(t[0] / t[1].clamp_min(1))


def _reduced_over(total, steps: int) -> float:
    """A per-step sum accumulated on every rank, summed across DDP ranks and divided by steps x world."""
    return float(all_reduce_sum_(torch.as_tensor(total, dtype=torch.float32).clone()) / steps)


def _avg(values) -> float:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else 0.0
