"""Learnable structure masks (Light-PEFT m_A, m_F) applied with forward pre-hooks.

m_A[l] has one entry per head unit (per KV group on GQA) and scales that unit's slice of the input of the
attention output projection; m_F[l] scales each FFN neuron at the input of the down projection. Masks are
fp32 parameters initialised to 1.

Besides the learned values, the masks can score their units by first-order Taylor importance (Michel et al.,
2019): |m * dL/dm| is the first-order loss change of zeroing the unit, averaged over the estimation window.
Gradients arrive already averaged across DDP ranks, so the accumulated scores are identical on every rank.

While collecting (prune.compensate), the same hooks also sum what each unit feeds its o / down projection
(after its mask: what the trained model computed), over the real tokens of training batches, so surgery can
replace a removed unit by its mean contribution (bias compensation, An et al. 2024, FLAP). With
prune.reconstruct they also sum the inputs' outer products (the window's second moments), so surgery can let
the kept columns of o / down absorb what the removed ones predictably contributed (least squares).
"""
from __future__ import annotations

import torch
from torch import nn

from ..arch import Arch
from ..dist import all_reduce_sum_, rank


class StructureMasks(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        self.heads = nn.ParameterList([nn.Parameter(torch.ones(arch.num_units)) for _ in arch.layers])
        self.ffn = nn.ParameterList([nn.Parameter(torch.ones(arch.intermediate_size)) for _ in arch.layers])
        self._handles: list = []
        self.taylor_sum: dict[str, list[torch.Tensor]] = {}
        self.taylor_n = 0
        self.collect_means = False  # set while the estimation window runs (prune.compensate / reconstruct)
        self.collect_moments = False  # second moments too (prune.reconstruct): an n x n sum per layer
        self.token_mask: torch.Tensor | None = None  # (batch, seq) 1 = real token; set before each forward
        # kind -> (layers, width) float64 sums of the o / down input and (layers,) token counts: committed steps
        # (input_sum / input_n) and the step in flight (_pending_*), committed by commit_inputs when finite;
        # kind "heads2" / "ffn2": (layers, width, width) sums of x x^T (prune.reconstruct)
        self.input_sum: dict[str, torch.Tensor] = {}
        self.input_n: dict[str, torch.Tensor] = {}
        self._pending_sum: dict[str, torch.Tensor] = {}
        self._pending_n: dict[str, torch.Tensor] = {}
        self._pending = False  # whether the buffers hold a step in flight
        self.tokens_seen = 0  # tokens behind the last input_means() / take_moments(), over all ranks

    def attach(self, hf_model) -> "StructureMasks":
        """Hook the (possibly LoRA-wrapped) o and down projections, so PEFT inputs are masked too."""
        self.detach()
        unit_width = self.arch.heads_per_unit * self.arch.head_dim
        for i, layer in enumerate(self.arch.layers):
            o = hf_model.get_submodule(layer.o)
            down = hf_model.get_submodule(layer.down)
            self._handles.append(o.register_forward_pre_hook(self._scaler("heads", i, unit_width)))
            self._handles.append(down.register_forward_pre_hook(self._scaler("ffn", i, 1)))
        return self

    def _scaler(self, kind: str, layer: int, width: int):
        mask = (self.heads if kind == "heads" else self.ffn)[layer]

        def hook(_module, args):
            x = args[0]
            shape = x.shape
            scaled = (x.view(*shape[:-1], -1, width) * mask.to(x.dtype)[:, None]).view(shape)
            if self.collect_means and torch.is_grad_enabled():  # training forwards, not evaluation
                self._add_input(kind, layer, scaled)
            return (scaled,) + tuple(args[1:])

        return hook

    @torch.no_grad()
    def _add_input(self, kind: str, layer: int, x: torch.Tensor) -> None:
        """Add x summed over the real tokens to the step in flight. The token mask is matched by element count:
        OPT flattens (batch, seq) before its FFN. Weighting by the mask (not indexing) keeps GPUs from syncing."""
        flat = x.detach().reshape(-1, x.shape[-1])
        tm = self.token_mask
        if tm is not None and tm.numel() == flat.shape[0]:
            w = (tm.reshape(-1, 1).to(device=flat.device) > 0).to(torch.float32)
        else:
            w = torch.ones(flat.shape[0], 1, device=flat.device)
        weighted = flat.to(torch.promote_types(flat.dtype, torch.float32)) * w  # fp16 / bf16 summed in fp32
        self._pend(kind, layer, weighted.sum(0), w.sum())
        if self.collect_moments:  # padding rows are zero in `weighted` (w is 0 / 1), so they add nothing;
            # the product in the input's precision (>= fp32: fp64 is slow on most GPUs), summed in fp64; autocast
            # (the hooks run inside the forward) would make it a bf16 / fp16 product
            with torch.autocast(flat.device.type, enabled=False):
                self._pend(kind + "2", layer, weighted.T @ weighted, w.sum())

    def _pend(self, kind: str, layer: int, total: torch.Tensor, count: torch.Tensor) -> None:
        """Add to the step-in-flight buffers (allocated once, zeroed in place by commit_inputs)."""
        if kind not in self._pending_sum:
            self._pending_sum[kind] = torch.zeros(len(self.arch.layers), *total.shape, dtype=torch.float64,
                                                  device=total.device)
            self._pending_n[kind] = torch.zeros(len(self.arch.layers), dtype=torch.float64, device=total.device)
        self._pending_sum[kind][layer] += total
        self._pending_n[kind][layer] += count
        self._pending = True

    @torch.no_grad()
    def commit_inputs(self, finite: bool = True) -> None:
        """After a step's backward: its input sums join the window's, unless the step was not finite (the fp16
        scaler skips it) or a sum overflowed: one inf activation would otherwise poison a whole bias."""
        if not self._pending:
            return
        self._pending = False
        pending, counts = self._pending_sum, self._pending_n
        if finite and bool(torch.stack([torch.isfinite(t).all() for t in pending.values()]).all()):
            for kind, t in pending.items():
                if kind in self.input_sum:
                    self.input_sum[kind] += t
                    self.input_n[kind] += counts[kind]
                else:
                    self.input_sum[kind], self.input_n[kind] = t.clone(), counts[kind].clone()
        for t in (*pending.values(), *counts.values()):
            t.zero_()

    def moment_bytes(self) -> int:
        """Device memory the second-moment sums take (prune.reconstruct): the window's and the step's, fp64."""
        widths = (self.arch.num_units * self.arch.heads_per_unit * self.arch.head_dim, self.arch.intermediate_size)
        return 2 * 8 * len(self.arch.layers) * sum(w * w for w in widths)

    def input_means(self) -> tuple[list[list[float]], list[list[float]]] | None:
        """Mean o-input per column (heads) and down-input per neuron (ffn) of every layer over the committed
        tokens of all ranks (data-parallel ranks see different batches; every rank must compensate alike), as
        plain lists (they go into checkpoints); None when nothing was collected. A collective: call on all ranks."""
        means = self._reduced(("heads", "ffn"))
        return None if means is None else (means[0].float().tolist(), means[1].float().tolist())

    def take_moments(self, centered: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Mean x x^T of the o-input (heads) and down-input (ffn) per layer, or with centered the covariance
        (centred from the float64 sums: the cancellation would eat float32 means), (layers, width, width)
        float64 CPU tensors over the committed tokens of all ranks (prune.reconstruct); None when nothing was
        collected. Takes them: the sums (layers x width^2, on the device) are all-reduced in place and freed, so
        the device never holds more than the window's sums. A collective: call on all ranks, once."""
        for d in (self._pending_sum, self._pending_n):
            for kind in ("heads2", "ffn2"):
                d.pop(kind, None)
        means = self._reduced(("heads", "ffn")) if centered else None
        out = self._reduced(("heads2", "ffn2"), take=True)
        if out is not None and means is not None:
            for t, m in zip(out, means):
                t -= m[:, :, None] * m[:, None, :]
        return out

    def _reduced(self, kinds: tuple[str, str], take: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Sums / token counts of two kinds over all ranks, as float64 CPU tensors; None when nothing was
        collected. take: the device sums are all-reduced in place and dropped, not copied."""
        if any(kind not in self.input_sum for kind in kinds):
            return None
        out = []
        for kind in kinds:
            total, n = ((self.input_sum.pop(kind), self.input_n.pop(kind)) if take
                        else (self.input_sum[kind].clone(), self.input_n[kind].clone()))
            total, n = all_reduce_sum_(total), all_reduce_sum_(n)
            if float(n.min()) == 0:
                return None
            out.append(total.cpu() / n.cpu().view(-1, *[1] * (total.dim() - 1)))
            self.tokens_seen = int(n[0])
        return out[0], out[1]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def l1(self) -> tuple[torch.Tensor, torch.Tensor]:
        heads = sum(m.abs().sum() for m in self.heads)
        ffn = sum(m.abs().sum() for m in self.ffn)
        return heads, ffn

    def head_values(self) -> list[torch.Tensor]:
        return [m.detach().float().cpu() for m in self.heads]

    def ffn_values(self) -> list[torch.Tensor]:
        return [m.detach().float().cpu() for m in self.ffn]

    @torch.no_grad()
    def accumulate_taylor(self, lambda_heads: float, lambda_ffn: float, finite: bool = True) -> None:
        """After backward: add |m * dL_task/dm| per unit (the L1 term's gradient lambda*sign(m) is removed).
        A step with finite=False (the GradScaler skips it) or with any non-finite term adds nothing and is
        not counted."""
        if not finite:
            return
        terms = {kind: [(p * (p.grad - lam * p.sign())).abs() if p.grad is not None else None for p in params]
                 for kind, params, lam in (("heads", self.heads, lambda_heads), ("ffn", self.ffn, lambda_ffn))}
        present = [t for ts in terms.values() for t in ts if t is not None]
        # one sync; mask gradients are already averaged across DDP ranks, so every rank decides alike
        if present and not bool(torch.stack([torch.isfinite(t).all() for t in present]).all()):
            return
        for kind, params in (("heads", self.heads), ("ffn", self.ffn)):
            sums = self.taylor_sum.setdefault(kind, [torch.zeros_like(p) for p in params])
            for acc, t in zip(sums, terms[kind]):
                if t is not None:
                    acc += t
        self.taylor_n += 1

    def taylor_values(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Mean Taylor importance per unit over the accumulated steps (heads, ffn)."""
        n = max(self.taylor_n, 1)
        out = [[t.detach().float().cpu() / n for t in self.taylor_sum.get(kind, [torch.zeros_like(p) for p in ps])]
               for kind, ps in (("heads", self.heads), ("ffn", self.ffn))]
        return out[0], out[1]

    def structure_scores(self, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """What heads and neurons are ranked by: "mask" (learned values) or "taylor" (accumulated importance)."""
        return (self.head_values(), self.ffn_values()) if kind == "mask" else self.taylor_values()

    def score_state(self) -> dict:
        """CPU copies (nested dict / lists of tensors and plain values), ready for a checkpoint."""
        return {"taylor_sum": {k: [t.detach().cpu().clone() for t in ts] for k, ts in self.taylor_sum.items()},
                "taylor_n": self.taylor_n,
                # all ranks' input sums (only rank 0 writes the checkpoint; load_score_state gives them to it)
                "input_sum": {k: all_reduce_sum_(t.clone()).cpu() for k, t in self.input_sum.items()},
                "input_n": {k: all_reduce_sum_(t.clone()).cpu() for k, t in self.input_n.items()}}

    def load_score_state(self, state: dict) -> None:
        """Restore onto the masks' own device: checkpoints load on the CPU, the masks may live on a GPU."""
        device = self.heads[0].device if len(self.heads) else torch.device("cpu")
        self.taylor_sum = {k: [t.to(device, copy=True) for t in ts] for k, ts in state["taylor_sum"].items()}
        self.taylor_n = state["taylor_n"]
        # the saved input sums hold every rank's tokens: rank 0 carries them on, the others start from zero
        keep = 1.0 if rank() == 0 else 0.0
        self.input_sum = {k: t.to(device, torch.float64) * keep for k, t in state.get("input_sum", {}).items()}
        self.input_n = {k: t.to(device, torch.float64) * keep for k, t in state.get("input_n", {}).items()
                        if k in self.input_sum}

    @torch.no_grad()
    def set_(self, heads: list[torch.Tensor] | None = None, ffn: list[torch.Tensor] | None = None) -> None:
        for dst, src in zip(self.heads, heads or []):
            dst.copy_(src)
        for dst, src in zip(self.ffn, ffn or []):
            dst.copy_(src)

