"""Target values v* for LSDM: the hidden state at the site that balances the gendered pronouns.

As MEMIT's ``compute_z`` (Meng et al. 2023, §4.2 eq. 16): a residual δ_j per key column j is added
to the residual stream after layer L (the last edited layer) at the site token of every prompt of
the column, and optimised so that the next-token distribution has P(male) = P(female) while the
rest of it is kept (docs/methods/lsdm.md, "The update"):

    loss = mean_i (log P_i(f) − log P_i(m))²  +  kl_weight · mean_i KL(p̃_i ‖ p̃_i^δ)
           + v_weight_decay · mean_j ‖δ_j‖² / ‖h_j‖²

where p̃ is the next-token distribution with the pair {male, female} merged into one outcome, so
the KL is blind to how the pair's mass is split but keeps its total and every other token.
The target is z_j = mean_{i∈j} h_i + δ_j.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Sequence

from biaslens.hooks import act_name
from biaslens.metrics import pronoun_ids

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float

    from biaslens.edit.hparams import LSDMHparams
    from biaslens.edit.keys import SiteBatch
    from biaslens.model import BiasModel

__all__ = ["merged_pair_kl", "length_buckets", "SuffixRunner", "KVSuffixRunner", "newton_steps",
           "compute_targets"]


def merged_pair_kl(lp0: "Float[torch.Tensor, 'n vocab']", lp: "Float[torch.Tensor, 'n vocab']",
                   male: "torch.Tensor", female: "torch.Tensor") -> "Float[torch.Tensor, 'n']":
    """KL(p0 ‖ p) after merging the tokens ``male[i]`` and ``female[i]`` into one outcome."""
    import torch

    rows = torch.arange(lp.shape[0], device=lp.device)
    p0 = lp0.exp()
    rest = p0 * (lp0 - lp)
    rest = rest.index_put((rows, male), torch.zeros_like(male, dtype=lp.dtype))
    rest = rest.index_put((rows, female), torch.zeros_like(female, dtype=lp.dtype))
    pair0 = torch.logaddexp(lp0[rows, male], lp0[rows, female])
    pair = torch.logaddexp(lp[rows, male], lp[rows, female])
    return rest.sum(-1) + pair0.exp() * (pair0 - pair)


def length_buckets(lengths: "torch.Tensor", size: int) -> list[list[int]]:
    """Indices grouped by prompt length (no padding inside a bucket), at most ``size`` each."""
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths.tolist()):
        by_len.setdefault(int(n), []).append(i)
    return [idx[s : s + size] for _, idx in sorted(by_len.items()) for s in range(0, len(idx), size)]


def _adder(delta_rows: "torch.Tensor", pos: "torch.Tensor"):
    """A hook adding ``delta_rows[i]`` to prompt i's hidden state at position ``pos[i]``."""
    import torch

    rows = torch.arange(len(pos), device=pos.device)

    def add(act, hook):
        act = act.clone()
        act[rows, pos] = act[rows, pos] + delta_rows.to(act.dtype)
        return act

    return add


def _clamp_(delta: "torch.Tensor", limit: "torch.Tensor") -> None:
    """MEMIT's norm clamp: ‖δ_j‖ ≤ limit_j."""
    import torch

    with torch.no_grad():
        norms = delta.norm(dim=-1)
        delta.mul_(torch.where(norms > limit, limit / norms.clamp(min=1e-12), torch.ones_like(norms))[:, None])


class SuffixRunner:
    """Next-token log-probs of a site's prompts with δ added to ``resid_post`` of ``layer`` at
    each prompt's site position, re-running only the blocks from ``layer`` on: the residual stream
    entering ``layer`` is computed once per length bucket (no padding inside a bucket) and only
    the last position is unembedded. The general fallback of :class:`KVSuffixRunner`."""

    def __init__(self, model: "BiasModel", site: "SiteBatch", layer: int, batch_size: int):
        import torch

        self.model, self.site, self.layer = model, site, layer
        self.name = act_name("resid_post", layer)
        self.buckets = length_buckets(site.batch.lengths, batch_size)
        self.prefix: dict[int, Any] = {}
        with torch.no_grad():
            for b in self.buckets:
                sub = site.batch.select(b)
                self.prefix[b[0]] = model.bridge.run_with_hooks(
                    sub.input_ids, attention_mask=sub.attention_mask, fwd_hooks=[],
                    stop_at_layer=layer) if layer > 0 else None

    def base_logprobs(self, idx: list[int]) -> "Float[torch.Tensor, 'batch vocab']":
        """The unedited model's next-token log-probs of prompts ``idx`` (one bucket)."""
        return self.logprobs(idx)

    def logprobs(self, idx: list[int], delta_rows=None, full: bool = True) -> "Float[torch.Tensor, 'batch vocab']":
        """Log-probs at the last token of prompts ``idx`` (one bucket) with ``delta_rows`` added."""
        import torch

        sub = self.site.batch.select(idx)
        hooks = [] if delta_rows is None else [(self.name, _adder(delta_rows, self.site.pos[idx]))]
        x = self.prefix[idx[0]]
        if x is None:
            logits = self.model.bridge.run_with_hooks(sub.input_ids, attention_mask=sub.attention_mask,
                                                      fwd_hooks=list(hooks), logits_to_keep=1)
        else:
            logits = self.model.bridge.run_with_hooks(x, attention_mask=sub.attention_mask,
                                                      fwd_hooks=list(hooks), start_at_layer=self.layer,
                                                      logits_to_keep=1)
        return torch.log_softmax(logits[:, -1].float(), -1)


class KVSuffixRunner:
    """:class:`SuffixRunner` doing less: δ enters the residual stream entering block
    ``layer + 1``, so only blocks ``layer + 1 ..`` run, and only at positions from the bucket's
    first site position on; earlier positions cannot change (causal attention) and their keys and
    values come from one base run's KV cache (the exact-patching engine's re-entry, checked once
    per bucket against the full forward). ``full=False``: only the pronoun columns are unembedded
    (enough for the gap, a log-ratio)."""

    def __init__(self, model: "BiasModel", site: "SiteBatch", layer: int, batch_size: int,
                 cache_hooks: Sequence[str] = ()):
        import torch

        from biaslens.locate.patching import Base, PatchEngine
        from biaslens.metrics import pronoun_log_ratio

        self.model, self.site, self.layer = model, site, layer
        self.start = layer + 1
        self.name = act_name("resid_pre", self.start)
        self.buckets = length_buckets(site.batch.lengths, batch_size)
        self.engines: dict[int, tuple[Any, int]] = {}
        for b in self.buckets:
            sub = site.batch.select(b)
            skip = int(site.pos[b].min())
            base = Base(sub.input_ids, sub.attention_mask, sub.lengths,
                        torch.arange(len(b), device=sub.input_ids.device))
            engine = PatchEngine(model, base, {}, pronoun_log_ratio(model, sub.prompts), cache_hooks,
                                 skip_noops=False, reentry_check=(self.start, skip), progress=False)
            if not engine.skip_prefix:
                raise RuntimeError("block re-entry with a cached prefix failed its check")
            self.engines[b[0]] = (engine, skip)

    @classmethod
    def build(cls, model: "BiasModel", site: "SiteBatch", layer: int, batch_size: int,
              cache_hooks: Sequence[str] = ()):
        """This runner where the model allows it, else :class:`SuffixRunner`."""
        if layer + 1 < model.n_layers:
            try:
                return cls(model, site, layer, batch_size, cache_hooks)
            except RuntimeError:
                pass
        return SuffixRunner(model, site, layer, batch_size)

    def site_acts(self, name: str) -> "Float[torch.Tensor, 'n_prompts d']":
        """The base run's activation of ``name`` (``resid_post`` of the layer, or a hook given as
        ``cache_hooks``) at every prompt's site token, in site order: the unedited model's."""
        import torch

        if name == act_name("resid_post", self.layer):
            name = self.name
        out = None
        for b in self.buckets:
            engine, _ = self.engines[b[0]]
            act = engine.base_cache[name]
            vals = act[torch.arange(len(b), device=act.device), self.site.pos[b]]
            if out is None:
                out = vals.new_empty((len(self.site),) + vals.shape[1:])
            out[b] = vals
        return out

    def base_logprobs(self, idx: list[int]) -> "Float[torch.Tensor, 'batch vocab']":
        """The unedited model's next-token log-probs of prompts ``idx``: the base run's own."""
        import torch

        return torch.log_softmax(self.engines[idx[0]][0].base_logits.float(), -1)

    def logprobs(self, idx: list[int], delta_rows=None, full: bool = True) -> "Float[torch.Tensor, 'batch vocab']":
        import torch

        engine, skip = self.engines[idx[0]]
        hooks = [] if delta_rows is None else [(self.name, _adder(delta_rows, self.site.pos[idx] - skip))]
        logits = engine.forward_from(self.start, hooks, skip, full=full)
        return torch.log_softmax(logits.float(), -1)


def newton_steps(run: "SuffixRunner | KVSuffixRunner", col, delta, male, female, steps: int,
                 limit, tol: float = 0.0) -> list[float]:
    """Minimum-norm Gauss-Newton steps on the pronoun gap: per column j with residuals r_j
    (log P(f) − log P(m) of its prompts) and Jacobian J_j, δ_j ← δ_j − J_jᵀ(J_j J_jᵀ + μI)⁻¹ r_j.
    One backward pass gives every prompt's Jacobian (the prompts are independent sequences).
    Stops early once the mean squared gap is ≤ ``tol`` (checked on the forward, before the
    backward is paid for). Returns the mean squared gap before each step taken, and the gap
    after the last one."""
    import torch

    site = run.site
    n, history = len(site), []
    for step in range(steps + 1):
        J = torch.zeros((n, delta.shape[1]), device=delta.device)
        r = torch.zeros(n, device=delta.device)
        graphs = []
        for idx in run.buckets:
            d_i = delta[col[idx]].detach().clone().requires_grad_(step < steps)
            lp = run.logprobs(idx, d_i, full=False)
            rows = torch.arange(len(idx), device=lp.device)
            gap = lp[rows, female[idx]] - lp[rows, male[idx]]
            r[idx] = gap.detach()
            graphs.append((idx, d_i, gap))
        history.append(float(r.pow(2).mean()))
        if step == steps or history[-1] <= tol:
            break
        for idx, d_i, gap in graphs:
            # only δ's gradient: parameters the bridge keeps outside model.params (GPT-2's split
            # q/k/v views) may still require grad, and a plain backward would compute theirs
            J[idx] = torch.autograd.grad(gap.sum(), d_i)[0]
        del graphs
        with torch.no_grad():
            for j in range(delta.shape[0]):
                m = (col == j).nonzero()[:, 0]
                if len(m) == 0:
                    continue
                Jj, rj = J[m].double(), r[m].double()
                G = Jj @ Jj.T
                G = G + 1e-6 * G.diagonal().mean().clamp(min=1e-12) * torch.eye(len(m), dtype=G.dtype, device=G.device)
                delta[j] -= (Jj.T @ torch.linalg.solve(G, rj)).to(delta.dtype)
            _clamp_(delta, limit)
    return history


def compute_targets(
    model: "BiasModel", site: "SiteBatch", layer: int, hp: "LSDMHparams", shared: bool = False,
    progress: bool = True, acts_out: dict | None = None,
) -> tuple["Float[torch.Tensor, 'g d_model']", dict[str, Any]]:
    """Targets z ``[n_groups, d_model]`` at ``resid_post`` of ``layer``; with ``shared`` one δ for
    all columns (ROME's single v*). ``hp.v_newton_steps`` minimum-norm Gauss-Newton steps on the
    gap start δ, then ``hp.v_steps`` Adam steps on the full loss (gap² + KL + decay) refine it.
    Returns ``(z, diagnostics)``. ``acts_out``: hook names as keys; their values are set to the
    (unedited) activations at the site tokens ``[n_prompts, d]``, taken from the same forward."""
    import torch
    from tqdm.auto import tqdm

    from biaslens.edit.keys import gather, group_mean

    name = act_name("resid_post", layer)
    wanted = list(acts_out or ())
    names = list(dict.fromkeys([name] + wanted))
    # the runner's base run keeps resid_post(layer) anyway (as the residual entering layer + 1)
    run = KVSuffixRunner.build(model, site, layer, hp.batch_size, [n for n in wanted if n != name])
    if isinstance(run, KVSuffixRunner):
        found = {n: run.site_acts(n) for n in names}
    else:
        found = gather(model, site, names, hp.batch_size)
    if acts_out is not None:
        acts_out.update({n: found[n] for n in wanted})
    h = found[name].float()
    h_group = group_mean(h, site.group, site.n_groups)
    male, female = pronoun_ids(model, site.batch.prompts)
    n = len(site)
    n_delta = 1 if shared else site.n_groups
    delta = torch.zeros((n_delta, model.d_model), device=model.device)
    col = torch.zeros_like(site.group) if shared else site.group
    h_norm = h_group.norm(dim=-1).mean(0, keepdim=True) if shared else h_group.norm(dim=-1)
    limit = hp.clamp_norm_factor * h_norm
    frozen = [p for p in model.params.values() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    history: list[dict] = []
    try:
        newton = newton_steps(run, col, delta, male, female, hp.v_newton_steps, limit, hp.v_tol)
        delta.requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        if hp.v_steps:
            with torch.no_grad():
                lp0 = {b[0]: run.base_logprobs(b) for b in run.buckets}
        bar = tqdm(range(hp.v_steps), desc="target values", disable=not progress, file=sys.stderr,
                   leave=False)
        for step in bar:
            opt.zero_grad()
            tot = {"gap": 0.0, "kl": 0.0}
            for idx in run.buckets:
                rows = torch.arange(len(idx), device=model.device)
                lp = run.logprobs(idx, delta[col[idx]])
                gap = lp[rows, female[idx]] - lp[rows, male[idx]]
                kl = merged_pair_kl(lp0[idx[0]], lp, male[idx], female[idx])
                loss = (gap.pow(2).sum() + hp.kl_weight * kl.sum()) / n
                loss.backward(inputs=[delta])  # δ only (see newton_steps)
                tot["gap"] += float(gap.detach().pow(2).sum()) / n
                tot["kl"] += float(kl.detach().sum()) / n
            decay = hp.v_weight_decay * (delta.pow(2).sum(-1) / h_norm.pow(2)).mean()
            decay.backward(inputs=[delta])
            history.append({"step": step, "gap_sq": tot["gap"], "kl": tot["kl"]})
            bar.set_postfix(gap_sq=f"{tot['gap']:.4f}", kl=f"{tot['kl']:.4f}")
            opt.step()
            _clamp_(delta.data, limit)
        bar.close()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    d = delta.detach()
    z = h_group + (d.expand(site.n_groups, -1) if shared else d)
    first = newton[0] if newton else (history[0]["gap_sq"] if history else None)
    info = {
        "layer": layer,
        "newton_steps": max(0, len(newton) - 1),
        "adam_steps": len(history),
        "initial_gap_sq": first,
        "gap_sq_after_newton": newton[-1] if len(newton) > 1 else None,
        "final_gap_sq": history[-1]["gap_sq"] if history else None,
        "final_kl": history[-1]["kl"] if history else None,
        "delta_norm_mean": float(d.norm(dim=-1).mean()),
        "delta_over_h": float((d.norm(dim=-1) / h_norm).mean()),
    }
    return z, info
