"""Export a (possibly edited) model as a Hugging Face folder any ``transformers`` user can load.

The folder holds the model (safetensors), config and tokenizer, plus ``delta.safetensors`` (only
the changed tensors, as ``updated - original``) and ``manifest.json`` (what changed and why).
Writes go to a temporary sibling folder that is renamed into place (:mod:`biaslens.io`), so a
failed or interrupted export leaves nothing half-written, and ``force`` replaces only a folder
biaslens wrote.

Verification reloads the folder and compares it with the in-memory model running the same plain
Hugging Face code: every tensor bit for bit, and the logits on a short general text within a
tolerance scaled to the dtype (normally they are identical). How far the TransformerLens bridge's
logits are from plain HF is recorded in ``manifest.json`` as information only.

A model placed by accelerate (``biaslens.load(..., device_map=...)``, docs/offload.md) is written
as safetensors shards of at most ``max_shard_size`` with ``model.safetensors.index.json`` (the
layout ``save_pretrained`` writes), each tensor read through the model's weight accessor from
wherever it lives, so memory holds one shard at a time. Its verification reads every tensor back
from the shards, and compares the logits of the folder reloaded by transformers with every
weight offloaded to disk against plain Hugging Face code running the model's current weights
through accelerate's offload hooks (``cpu_offload``), one module at a time.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

from biaslens.errors import ExportError
from biaslens.io import publish_modes
from biaslens.jsonio import dumps
from biaslens.model import fresh_module, meta_module, reference_module, state_dict_copy, tied_aliases

if TYPE_CHECKING:
    from biaslens.delta import WeightDelta
    from biaslens.model import BiasModel


__all__ = ["export", "preflight", "tolerance", "check_out_dir", "dumps_manifest",
           "DISPATCHED_SHARD_SIZE", "PROBE_TEXT", "TOL_EPS"]

#: the largest shard an export of a model placed by accelerate writes by default (memory holds one)
DISPATCHED_SHARD_SIZE = "2GB"


def check_out_dir(out: str | Path, force: bool = False) -> Path:
    """Alias of :func:`biaslens.io.prepare` (the one output-folder policy)."""
    from biaslens.io import prepare

    return prepare(out, force)


def _shard_bytes(size: Any) -> int:
    from biaslens.cliargs import check, size_bytes

    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ExportError(f"max_shard_size must be above zero, not {size}")
        return size
    return int(check(size, size_bytes, "max_shard_size"))


def _saved_names(model: "BiasModel") -> list[str]:
    """What ``save_pretrained`` would write: every parameter once (tied ones under the name
    ``model.params`` holds) and the persistent buffers, in state-dict order."""
    fresh = meta_module(model)
    aliases = tied_aliases(fresh, model.params)
    names = [k for k in fresh.state_dict() if k not in aliases]
    lost = [k for k in names if k not in model.params and k not in model.buffers]
    extra = [k for k in model.params if k not in set(names)]
    if lost or extra:
        raise ExportError(f"cannot map {(lost + extra)[:3]} onto the model's state dict: unsupported layout")
    return names


def _write_shards(model: "BiasModel", folder: Path, max_shard_size: Any) -> list[str]:
    """The weights as safetensors shards of at most ``max_shard_size`` bytes (a larger tensor gets
    a shard of its own) plus ``model.safetensors.index.json`` when there are several, as
    ``save_pretrained`` lays them out; each tensor read through the model's accessor, one shard
    in memory at a time. Returns the shard file names."""
    import json

    from safetensors.torch import save_file

    limit = _shard_bytes(max_shard_size)
    names = _saved_names(model)
    sizes = {n: (model.params[n] if n in model.params else model.buffers[n]).numel()
             * (model.params[n] if n in model.params else model.buffers[n]).element_size() for n in names}
    groups: list[list[str]] = [[]]
    used = 0
    for n in names:
        if groups[-1] and used + sizes[n] > limit:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += sizes[n]
    k = len(groups)
    files = (["model.safetensors"] if k == 1 else
             [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)])
    weight_map = {}
    for f, group in zip(files, groups):
        shard = {}
        for n in group:
            t = model.param(n) if n in model.params else model.buffers[n]
            shard[n] = t.detach().to("cpu").contiguous().clone()
            weight_map[n] = f
        save_file(shard, str(folder / f), metadata={"format": "pt"})
        del shard
    if k > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def _write_config(model: "BiasModel", folder: Path) -> None:
    import copy

    cfg = copy.deepcopy(model.hf.config)
    cfg.architectures = [type(model.hf).__name__]
    cfg.dtype = model.dtype
    cfg.save_pretrained(folder)
    gen = getattr(model.hf, "generation_config", None)
    if gen is not None and model.hf.can_generate():
        gen.save_pretrained(folder)


#: General text for the round-trip check: words, digits and punctuation, no special topic.
PROBE_TEXT = "The river runs past the old mill, and in 1987 the town had 4,200 people."

#: The reloaded model runs the same code on the same weights as the in-memory HF module, so its
#: logits are normally bit-identical. Where they are not (a kernel that reduces in another order,
#: e.g. on an accelerator), two runs differ by rounding: a few units of the dtype's epsilon at the
#: scale of the largest logit. Measured between two *different* implementations of the same math
#: (the TransformerLens bridge vs plain HF, GPT-2 shapes up to 12 layers x 768), the difference
#: stayed at or below ~9 eps * max|logit| in float32, float16 and bfloat16; ``TOL_EPS`` = 16 gives
#: that twice over for the same code. A wrong export is caught in any case by the bit-exact
#: comparison of every reloaded tensor with the in-memory one.
TOL_EPS = 16


def _probe_ids(model: "BiasModel", text: str = PROBE_TEXT):
    """``[1, n]`` token ids of ``text`` as the model encodes prompts (with BOS where it prepends
    one; tokenizers without a BOS token get none), kept inside the model's vocabulary and context."""
    import torch

    tok = model.tokenizer
    ids = model.tokenize([text], length="truncate")[0][:64]
    vocab = getattr(model.hf.config, "vocab_size", None)
    ids = [i for i in ids if i is not None and (not vocab or 0 <= i < vocab)]  # no BOS: no None
    if not ids:
        ids = [next((i for i in (tok.bos_token_id, tok.eos_token_id) if i is not None), 0)]
    return torch.tensor([ids], dtype=torch.long)


def tolerance(dtype, logits_max_abs: float, k: float = TOL_EPS) -> float:
    """Largest reloaded-vs-in-memory logits difference accepted for ``dtype``:
    ``k * eps(dtype) * max(1, max|logits|)``."""
    import torch

    return float(k * torch.finfo(dtype).eps * max(1.0, float(logits_max_abs)))


def dumps_manifest(man: dict[str, Any]) -> str:
    """Strict JSON (no NaN/Infinity) for a manifest."""
    return dumps(man)


def preflight(model: "BiasModel") -> None:
    """Raise :class:`ExportError` now for what would make :func:`export` refuse the model as it
    is (NaN/inf weights, NaN/inf logits on the probe text, e.g. float16 overflow), so a command
    can fail before minutes of editing rather than after. Any float dtype exports."""
    import torch

    if not model.dtype.is_floating_point:
        raise ExportError(f"cannot export a {model.dtype} model: load it with a float dtype")
    bad = model.check_finite()
    if bad:
        raise ExportError(f"{len(bad)} tensor(s) hold NaN or inf before any edit (first: {bad[0]})")
    logits = _logits(reference_module(model), _probe_ids(model).to(model.device))
    if not torch.isfinite(logits).all():
        raise ExportError(_nonfinite_message(model.dtype))


def _nonfinite_message(dtype) -> str:
    import torch

    hint = "; load it in float32 or bfloat16 and export again" if dtype == torch.float16 else ""
    return (f"cannot export: the {str(dtype).replace('torch.', '')} model's logits are NaN or "
            f"inf on a short general text although its weights are finite{hint}")


def export(
    model: "BiasModel",
    out: str | Path,
    delta: "WeightDelta | None" = None,
    manifest: dict[str, Any] | None = None,
    force: bool = False,
    verify: bool = True,
    atol: float | None = None,
    files: dict[str, Any] | None = None,
    command: str = "export",
    max_shard_size: int | str | None = None,
) -> Path:
    """Write ``model`` to ``out`` as a Hugging Face folder with ``delta.safetensors`` and
    ``manifest.json``. Refuses NaN/inf weights and an existing non-empty folder (unless
    ``force``). Works in the model's dtype (float32, float16, bfloat16 reload as such).

    With ``verify``, reloads the folder with ``transformers`` and refuses it unless every tensor
    equals the in-memory one bit for bit, the reloaded dtype is the model's, and its logits on a
    short general-text probe are finite and match the in-memory plain HF module (same code, same
    weights, eager attention) within ``atol`` (default :func:`tolerance`, scaled to the dtype and
    the logits' magnitude). The TransformerLens bridge's difference from plain HF is recorded in
    the manifest's ``verification`` as information, never a refusal.

    ``files``: extra JSON files (name -> data) written into the folder, e.g. a report. The
    folder is written and replaced as :mod:`biaslens.io` describes (``force`` replaces only a
    folder biaslens wrote); its marker names ``command``.

    ``max_shard_size`` (bytes, or a size like ``"2GB"``): the largest weight shard. A model placed
    by accelerate is always written as shards (default :data:`DISPATCHED_SHARD_SIZE`: memory holds
    one shard) and verified with the folder reloaded by transformers with every weight on disk
    (see the module docstring); a model loaded whole goes through ``save_pretrained`` (its default
    shard size when None).
    """
    import torch

    import biaslens
    from biaslens.io import staging

    bad = model.check_finite()
    if bad:
        raise ExportError(
            f"refusing to export: {len(bad)} tensor(s) hold NaN or inf (first: {bad[0]}); "
            "undo the edit (delta.undo(model)) and retry with a smaller step or stronger regularisation"
        )
    if max_shard_size is not None:
        _shard_bytes(max_shard_size)  # a bad size fails before any writing
    stage = staging(out, force, command=command)
    with stage as tmp:
        if model.dispatched:
            shards = _write_shards(model, tmp, max_shard_size or DISPATCHED_SHARD_SIZE)
            _write_config(model, tmp)
        else:
            state = state_dict_copy(model)
            fresh = fresh_module(model, state)
            kw = {} if max_shard_size is None else {"max_shard_size": _shard_bytes(max_shard_size)}
            fresh.save_pretrained(tmp, safe_serialization=True, **kw)
            del fresh, state  # the reload below needs the memory more
            shards = sorted(f.name for f in tmp.glob("*.safetensors"))
        model.tokenizer.save_pretrained(tmp)
        if delta is not None:
            delta.save(tmp / "delta.safetensors")
        else:
            from safetensors.torch import save_file

            save_file({}, str(tmp / "delta.safetensors"), metadata={"method": "none"})
        verification = _verify(model, tmp, atol) if verify else None
        base_hash = model.weight_hash(delta.original if delta is not None else None)
        man: dict[str, Any] = {
            "biaslens_version": biaslens.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "base_model": {
                "spec": model.spec,
                "architecture": type(model.hf).__name__,
                "weight_sha256": base_hash,
            },
            "weight_sha256": model.weight_hash(),
            "dtype": str(model.dtype).replace("torch.", ""),
            "method": delta.method if delta is not None else None,
            "hyperparameters": delta.hparams if delta is not None else {},
            "changed_tensors": delta.stats() if delta is not None else [],
            "prepend_bos": model.prepend_bos,
            "weight_files": shards,
            **({"placement": {k: v for k, v in model.placement_info().items()
                              if k != "offload_folder"}} if model.dispatched else {}),  # no local paths
            "verification": verification,
            "versions": {"torch": torch.__version__, **_versions()},
        }
        if delta is not None:
            man.update({k: v for k, v in delta.info.items() if k not in man})
        man.update(manifest or {})
        (tmp / "manifest.json").write_text(dumps_manifest(man))
        for name, obj in (files or {}).items():
            (tmp / name).write_text(dumps(obj), encoding="utf-8")
        publish_modes(tmp)
    return stage.out


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("transformers", "transformer-lens"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _logits(module, ids):
    """Float32 logits of a plain HF module in eval mode (its train/eval mode is restored)."""
    import torch

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return module(ids).logits.float()
    finally:
        module.train(was_training)


def _verify(model: "BiasModel", folder: Path, atol: float | None = None) -> dict[str, Any]:
    """Reload ``folder`` and compare it with the in-memory model; raise ExportError if it is not
    the same model. Returns the numbers for the manifest."""
    import torch
    from transformers import AutoModelForCausalLM

    if model.dispatched:
        return _verify_dispatched(model, folder, atol)
    dtype, device = model.dtype, model.device
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", attn_implementation="eager")
    try:
        if reloaded.dtype != dtype:
            raise ExportError(f"exported model reloads as {reloaded.dtype}, not {dtype}; nothing was written")
        reloaded.to(device).eval()
        saved = reloaded.state_dict()
        for n, p in model.params.items():
            q = saved.get(n)
            if q is None or q.shape != p.shape or q.dtype != p.dtype or not torch.equal(q, p.detach()):
                why = "is missing" if q is None else "differs from the in-memory tensor"
                raise ExportError(f"exported tensor {n} {why} after reloading; nothing was written")
        del saved
        ids = _probe_ids(model).to(device)
        ref = _logits(model.plain_module(), ids)
        got = _logits(reloaded, ids)
    finally:
        del reloaded
    if not torch.isfinite(ref).all() or not torch.isfinite(got).all():
        raise ExportError(_nonfinite_message(dtype) + "; nothing was written")
    peak = float(ref.abs().max())
    tol = tolerance(dtype, peak) if atol is None else float(atol)
    diff = float((got - ref).abs().max())
    if not diff <= tol:
        raise ExportError(
            f"exported model's logits differ from the in-memory model (plain HF, same weights) by "
            f"{diff:.3g} (> tolerance {tol:.3g} for {dtype}, max |logit| {peak:.3g}); nothing was written"
        )
    bridge: float | None
    bridge_error = None
    try:
        with torch.no_grad():
            b = model.forward(ids).float()
        bridge = float((b - ref).abs().max())
    except Exception as exc:  # information only: never a reason to refuse a correct export
        bridge, bridge_error = None, f"{type(exc).__name__}: {exc}"[:300]
    info: dict[str, Any] = {
        "probe_tokens": int(ids.shape[1]),
        "dtype": str(dtype).replace("torch.", ""),
        "logits_max_abs": peak,
        "reloaded_vs_hf_max_abs": diff,
        "tolerance": tol,
        "tensors_bit_exact": True,
        "bridge_vs_hf_max_abs": bridge,
    }
    if bridge_error:
        info["bridge_error"] = bridge_error
    return info


def _verify_dispatched(model: "BiasModel", folder: Path, atol: float | None = None) -> dict[str, Any]:
    """:func:`_verify` for a model placed by accelerate, in bounded memory: every tensor read back
    from the shards (one at a time) and compared bit for bit with the model's; the folder reloaded
    by transformers with every weight on disk (``device_map={"": "disk"}``: it reads the shards
    in place), its logits compared with :func:`reference_module`'s."""
    import json
    import shutil
    import tempfile

    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    dtype = model.dtype
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    seen = set()
    for f in files:
        with safe_open(str(folder / f), framework="pt") as sf:
            for n in sf.keys():
                q = sf.get_tensor(n)
                p = model.param(n) if n in model.params else model.buffers.get(n)
                if p is None or q.shape != p.shape or q.dtype != p.dtype or not torch.equal(q, p.detach().to("cpu")):
                    why = "is not the model's" if p is None else "differs from the model's tensor"
                    raise ExportError(f"exported tensor {n} {why} after reading it back; nothing was written")
                seen.add(n)
    lost = [n for n in model.params if n not in seen]
    if lost:
        raise ExportError(f"exported folder lacks {lost[:3]} after reading it back; nothing was written")
    scratch = tempfile.mkdtemp(prefix="biaslens-verify-")
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(
            folder, dtype="auto", attn_implementation="eager", device_map={"": "disk"},
            offload_folder=scratch)
        if reloaded.dtype != dtype:
            raise ExportError(f"exported model reloads as {reloaded.dtype}, not {dtype}; nothing was written")
        ids = _probe_ids(model)
        got = _logits(reloaded, ids).to("cpu")
        del reloaded
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ref = _logits(reference_module(model), ids.to(model.device)).to("cpu")
    if not torch.isfinite(ref).all() or not torch.isfinite(got).all():
        raise ExportError(_nonfinite_message(dtype) + "; nothing was written")
    peak = float(ref.abs().max())
    tol = tolerance(dtype, peak) if atol is None else float(atol)
    diff = float((got - ref).abs().max())
    if not diff <= tol:
        raise ExportError(
            f"exported model's logits differ from the model (plain HF, same weights) by {diff:.3g} "
            f"(> tolerance {tol:.3g} for {dtype}, max |logit| {peak:.3g}); nothing was written")
    bridge_error = None
    try:
        with torch.no_grad():
            bridge = float((model.forward(ids.to(model.device)).float().to("cpu") - ref).abs().max())
    except Exception as exc:  # information only
        bridge, bridge_error = None, f"{type(exc).__name__}: {exc}"[:300]
    info: dict[str, Any] = {
        "probe_tokens": int(ids.shape[1]),
        "dtype": str(dtype).replace("torch.", ""),
        "logits_max_abs": peak,
        "reloaded_vs_hf_max_abs": diff,
        "tolerance": tol,
        "tensors_bit_exact": True,
        "bridge_vs_hf_max_abs": bridge,
        "reloaded_with": "transformers from_pretrained(device_map={'': 'disk'})",
        "reference": "plain HF on the model's weights through accelerate cpu_offload",
    }
    if bridge_error:
        info["bridge_error"] = bridge_error
    return info
