"""The edit site: which token of which prompt, grouped into key columns, and activations there.

A :class:`SiteBatch` is a prompt set with one position per prompt (the site's token role) and a
column index per prompt. Prompts in one column share a key and a target: MEMIT averages a
subject's keys over context templates (one column per subject); at the ``last`` role every prompt
is its own column, so the edit sees many template endings.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from biaslens.errors import BiasLensError
from biaslens.prompts import SINGLE_ROLES, TokenBatch

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float

    from biaslens.model import BiasModel

__all__ = ["SiteBatch", "check_role", "site_batch", "chunks", "gather", "group_mean"]


@dataclass
class SiteBatch:
    """``batch`` (all prompts), ``pos[i]`` the site token of prompt i, ``group[i]`` its column."""

    batch: TokenBatch
    pos: "torch.Tensor"  # LongTensor [n_prompts]
    group: "torch.Tensor"  # LongTensor [n_prompts]
    labels: list[str]  # one per column
    role: str
    #: the template of each column (index into ``template_labels``) when every column is one
    #: template's (one column per prompt); None when columns average over templates
    column_template: "torch.Tensor | None" = None
    template_labels: list[str] | None = None

    @property
    def n_groups(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        return len(self.batch)


def check_role(role: str) -> str:
    if role not in SINGLE_ROLES:
        raise BiasLensError(f"edit role must be one of {', '.join(SINGLE_ROLES)} (one token per "
                            f"prompt), not {role!r}")
    return role


def site_batch(model: "BiasModel", prompts: Sequence[Any], role: str,
               average: str = "auto") -> SiteBatch:
    """Encode ``prompts`` and group them into key columns.

    ``average``: ``"subject"`` = one column per subject (MEMIT's average over templates);
    ``"none"`` = one column per prompt; ``"auto"`` = ``"none"`` at the ``last`` role, else
    ``"subject"``.
    """
    import torch

    check_role(role)
    if not prompts:
        raise BiasLensError("no prompts to edit with; pass occupation prompts")
    batch = model.encode(list(prompts))
    if role != "last" and any(p.subject is None for p in batch.prompts):
        raise BiasLensError(f"role {role!r} needs every prompt to name its subject "
                            "(Prompt(text, subject=...))")
    pos = batch.index(role)
    mode = ("none" if role == "last" else "subject") if average == "auto" else average
    if mode == "subject":
        keys = [p.subject or p.text for p in batch.prompts]
    else:
        keys = batch.texts
    labels: list[str] = []
    index: dict[str, int] = {}
    for k in keys:
        if k not in index:
            index[k] = len(labels)
            labels.append(k)
    group = torch.tensor([index[k] for k in keys], dtype=torch.long, device=model.device)
    col_tpl, tpl_labels = None, None
    if mode != "subject":
        from biaslens.evaluate.contrast import template_of

        first = {}  # column -> its first prompt
        for i, k in enumerate(keys):
            first.setdefault(index[k], i)
        names = [template_of(batch.prompts[first[j]]) for j in range(len(labels))]
        tpl_labels = list(dict.fromkeys(names))
        where = {t: i for i, t in enumerate(tpl_labels)}
        col_tpl = torch.tensor([where[t] for t in names], dtype=torch.long, device=model.device)
    return SiteBatch(batch, pos, group, labels, role, col_tpl, tpl_labels)


def chunks(n: int, size: int) -> Iterable[list[int]]:
    for s in range(0, n, size):
        yield list(range(s, min(n, s + size)))


def gather(model: "BiasModel", site: SiteBatch, names: Sequence[str],
           batch_size: int = 256) -> dict[str, "Float[torch.Tensor, 'n_prompts d']"]:
    """Activations of hooks ``names`` at each prompt's site token (no grad), ``[n_prompts, d]``."""
    import torch

    out: dict[str, list] = {n: [] for n in names}
    wanted = set(names)
    deepest = max(_layer_of(n) for n in names)
    with torch.no_grad():
        for idx in chunks(len(site), batch_size):
            sub = site.batch.select(idx)
            pos = site.pos[idx]
            rows = torch.arange(len(idx), device=pos.device)
            store: dict = {}

            def keep(act, hook, name):  # hook.name may be the bridge's name, not the alias
                store[name] = act[rows, pos].detach()
                return act

            model.bridge.run_with_hooks(sub.input_ids, attention_mask=sub.attention_mask,
                                        fwd_hooks=[(n, partial(keep, name=n)) for n in wanted],
                                        stop_at_layer=deepest + 1 if deepest >= 0 else None,
                                        logits_to_keep=1)  # if it runs to the end
            for n in names:
                out[n].append(store[n])
    return {n: torch.cat(v) for n, v in out.items()}


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else -1


def group_mean(x: "Float[torch.Tensor, 'n d']", group: "torch.Tensor",
               n_groups: int) -> "Float[torch.Tensor, 'g d']":
    """Mean of the rows of ``x`` in each column group."""
    import torch

    sums = torch.zeros((n_groups, x.shape[1]), dtype=x.dtype, device=x.device)
    sums.index_add_(0, group, x)
    counts = torch.bincount(group, minlength=n_groups).clamp(min=1).to(x.dtype)
    return sums / counts[:, None]
