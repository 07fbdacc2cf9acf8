"""Distributed PCGU on torch FSDP (Dige et al. 2024 ran PCGU under FSDP for 2.7B–13B models).

Run with ``torchrun`` (or ``python -m torch.distributed.run``)::

    python -m torch.distributed.run --nproc_per_node=2 -m biaslens.unlearn.distributed \\
        --model organism --pairs organism --k 10000 --out edited/

No process ever holds the whole model while it trains (measured: ``docs/results/fsdp_memory.md``):

* **Build on meta, load only the shard.** The plain Hugging Face module is built from its config
  with every parameter on the ``meta`` device (no storage; buffers such as rotary frequencies are
  computed for real, as ``from_pretrained`` computes them) and sharded with FSDP2
  (``torch.distributed.fsdp.fully_shard``: each parameter becomes a DTensor split along dim 0 in
  ``torch.chunk`` blocks; one FSDP group per transformer block plus the root). ``to_empty``
  allocates only the local blocks, and each rank fills them with the rows it owns, read with
  ``safetensors`` slices (``safe_open(...).get_slice(name)[start:stop]``) straight from the
  checkpoint: no rank (rank 0 included) reads a whole tensor of a sharded parameter.
* **Train on shards.** Each process scores its slice of every batch; FSDP all-gathers one block's
  weights at a time for the forward and backward passes and reduce-scatters the gradients, so each
  process holds the dim-0 shard of ``g_a`` and ``g_d``. The per-unit cosine needs, for every unit,
  ``g_a·g_d``, ``|g_a|²`` and ``|g_d|²``: each process computes them on its shard (complete for
  units along dim 0, partial sums for units along dim 1 and 1-D parameters) and one all-reduce of
  that ``[3, n_units]`` tensor gives every process the same cosines — no whole gradient is
  gathered. Every process then selects the same ``k`` units and steps its own shard, exactly as
  :func:`biaslens.unlearn.pcgu` does in one process (same units, same weights).
* **The result stays sharded.** :class:`ShardedDelta` keeps each process's rows of the changed
  tensors; :meth:`ShardedDelta.save` streams ``delta.safetensors`` to rank 0 one tensor at a time.
  An ``--out`` export writes a whole Hugging Face folder and verifies it by reloading, which needs
  the full weights: rank 0 then loads the model once more and receives the updated tensors one at
  a time (after training, measured separately).
* **Allocator.** The torchrun entry point fixes glibc's mmap threshold
  (:func:`fixed_mmap_threshold`): FSDP frees a block's gathered weights and gradients at every
  layer, and glibc's default threshold policy keeps those freed buffers in the heap.

Measured on a GPT-2-shaped model of 1.2 GB of parameters, a rank's peak RSS through load and one
step is 0.58× that of one process holding the whole model (``benchmarks/fsdp_memory.py``).

:func:`pcgu_fsdp` also takes an already loaded :class:`~biaslens.model.BiasModel` (every process
then already holds the whole model; the training state is sharded and the result gathered back).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from biaslens.errors import BiasLensError, ModelLoadError
from biaslens.unlearn.partitioned import Engine, PCGUConfig, run

if TYPE_CHECKING:
    from biaslens.locate.effects import EffectMap
    import torch

    from biaslens.delta import WeightDelta
    from biaslens.model import BiasModel
    from biaslens.unlearn.pairs import ContrastPair

__all__ = ["FSDPEngine", "ShardedDelta", "ShardedModel", "fixed_mmap_threshold", "load_sharded", "main", "pcgu_fsdp",
           "shard_rows"]


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise BiasLensError("pcgu_fsdp needs a torch.distributed process group: launch with "
                            "`torchrun --nproc_per_node=N -m biaslens.unlearn.distributed ...`")
    return dist


def shard_rows(n_rows: int, world: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of the dim-0 rows FSDP2 gives ``rank`` of ``world`` for a tensor with
    ``n_rows`` rows (the ``torch.chunk`` split: blocks of ``ceil(n_rows / world)``; trailing ranks
    may get fewer rows or none)."""
    chunk = math.ceil(n_rows / world) if n_rows else 0
    start = min(rank * chunk, n_rows)
    return start, min(start + chunk, n_rows)


class FSDPEngine(Engine):
    """PCGU under FSDP2: parameters and gradients are DTensors sharded along dim 0 (the
    ``torch.chunk`` split), per-unit statistics are all-reduced; the model is a :class:`ShardedModel`."""

    method = "pcgu-fsdp"
    # Every rank must run the same number of forwards (each all-gathers the blocks), so a rank's
    # share of a batch runs as one part, not in parts of GRAD_TOKENS as in one process.
    grad_tokens = None

    def __init__(self):
        dist = _dist()
        self.world, self.rank = dist.get_world_size(), dist.get_rank()

    def prepare(self, model: "ShardedModel", names: Sequence[str]):
        return model.module, [model.params[n] for n in names]

    def split(self, idx: list[int]) -> tuple[list[int], float]:
        """Pairs ``rank::world`` of the batch, weighted so the FSDP-averaged gradient is the batch
        mean; a process without pairs runs the first pair with weight 0 (FSDP needs every rank)."""
        mine = idx[self.rank:: self.world]
        if not mine:
            return idx[:1], 0.0
        return mine, self.world / len(idx)

    def finish(self, model: "ShardedModel", names: Sequence[str], params: Sequence["torch.Tensor"]) -> None:
        """Nothing to do: the trained shards are the model's own parameters."""

    def local(self, t: "torch.Tensor") -> "torch.Tensor":
        return t.to_local() if hasattr(t, "to_local") else t

    def row_offset(self, t: "torch.Tensor") -> int:
        if not hasattr(t, "placements"):
            return 0
        from torch.distributed.tensor import Shard

        if tuple(t.placements) != (Shard(0),):
            raise RuntimeError(f"expected FSDP dim-0 sharding, got {t.placements}")
        start, stop = shard_rows(t.shape[0], self.world, self.rank)
        if t.to_local().shape[0] != stop - start:
            raise RuntimeError("FSDP shard sizes do not follow torch.chunk; cannot place units")
        return start

    def all_reduce(self, t: "torch.Tensor") -> "torch.Tensor":
        import torch.distributed as dist

        dist.all_reduce(t)
        return t

    def info(self) -> dict[str, Any]:
        return {"world_size": self.world}


# ----------------------------------------------------------------------------- building on meta


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered while open is replaced by a ``meta`` tensor of its shape and
    dtype (no storage); buffers are created for real. A module that allocates a parameter with
    ``torch.empty`` leaves pages the process never touches, so they never count towards its RSS."""
    import torch

    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def _skeleton(config, dtype: "torch.dtype"):
    """The plain HF causal LM of ``config`` in ``dtype`` with its parameters on ``meta`` and its
    buffers real (eager attention, eval mode; tied parameters are one Parameter)."""
    import warnings

    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings(), _parameters_on_meta():
        warnings.simplefilter("ignore")
        module = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    return module.eval()


def _aliases(module) -> dict[str, list[str]]:
    """Every deduplicated parameter name → all the names it goes by (tied weights have several)."""
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        key = id(p)
        if key not in first:
            first[key] = n
        out.setdefault(first[key], []).append(n)
    return out


class _Rows:
    """Reads dim-0 row blocks of named tensors and records every read (instrumentation for the
    claim that no rank reads a whole sharded tensor): ``reads`` holds ``(name, start, stop, n_rows)``."""

    def __init__(self):
        self.reads: list[tuple[str, int, int, int]] = []

    def _record(self, name: str, start: int, stop: int, n_rows: int) -> None:
        self.reads.append((name, start, stop, n_rows))


class _CheckpointRows(_Rows):
    """Row blocks straight from a folder's ``*.safetensors`` files (``get_slice``: only the bytes
    of those rows are read; each file is opened per read, so no mapping outlives it)."""

    def __init__(self, folder: Path, spec: str):
        super().__init__()
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / f for f in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(
                f"'{spec}' holds no *.safetensors weights; distributed PCGU reads each rank's rows "
                "from safetensors: save the model with save_pretrained(..., safe_serialization=True)")
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            try:
                with safe_open(str(f), "pt") as h:
                    for k in h.keys():
                        self.where[k] = f
                        self.shapes[k] = tuple(h.get_slice(k).get_shape())
            except Exception as exc:  # noqa: BLE001 - any unreadable file is named
                raise ModelLoadError(f"cannot read the weights of '{spec}': {f.name} is damaged or "
                                     f"truncated ({type(exc).__name__}); copy or save the model again") from None

    def keys(self) -> list[str]:
        return list(self.where)

    def rows(self, name: str, start: int, stop: int) -> "torch.Tensor":
        from safetensors import safe_open

        with safe_open(str(self.where[name]), "pt") as h:
            t = h.get_slice(name)[start:stop]
        self._record(name, start, stop, self.shapes[name][0])
        return t


class _TensorRows(_Rows):
    """Row blocks of tensors already in memory (a loaded :class:`~biaslens.model.BiasModel`)."""

    def __init__(self, tensors: dict[str, "torch.Tensor"]):
        super().__init__()
        self.tensors = tensors
        self.shapes = {n: tuple(t.shape) for n, t in tensors.items()}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def rows(self, name: str, start: int, stop: int) -> "torch.Tensor":
        self._record(name, start, stop, self.shapes[name][0])
        return self.tensors[name].detach()[start:stop]


def _renamer(module):
    """Checkpoint key → ``(module key, needs_conversion)`` as ``from_pretrained`` renames it
    (transformers' own checkpoint conversion mapping: legacy names such as GPT-NeoX's
    ``embed_out`` and the base-model prefix); ``needs_conversion`` when the key is one of a
    transform that merges or splits tensors, which row slices cannot do."""
    prefix = getattr(module, "base_model_prefix", "") or ""
    meta_keys = dict.fromkeys(module.state_dict(keep_vars=True))
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(module)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
    except (ImportError, AttributeError, TypeError):  # another transformers: names and prefix only
        rename_source_key, renamings, converters = None, [], []

    def rename(key: str) -> tuple[str, bool]:
        if rename_source_key is not None:
            new, pattern = rename_source_key(key, renamings, converters, prefix or None, meta_keys)
            if new not in meta_keys and key in meta_keys:
                new, pattern = key, None
            return new, pattern is not None
        if key not in meta_keys and prefix and f"{prefix}.{key}" in meta_keys:
            return f"{prefix}.{key}", False
        return key, False

    return rename


def _match_keys(module, source: _Rows, spec: str) -> dict[str, str]:
    """Module parameter name → checkpoint key (checkpoint keys renamed as ``from_pretrained``
    renames them; any alias of a tied weight will do); refuses missing, mis-shaped, unexpected and
    converted tensors as :func:`biaslens.load` would refuse or cannot slice them."""
    import re

    rename = _renamer(module)
    by_model: dict[str, str] = {}
    converted = []
    for key in source.keys():
        new, conversion = rename(key)
        if conversion:
            converted.append(key)
        by_model.setdefault(new, key)
    found, missing, mismatched = {}, [], []
    params = dict(module.named_parameters())
    for name, names in _aliases(module).items():
        key = next((by_model[n] for n in names if n in by_model), None)
        if key is None:
            missing.append(name)
            continue
        if source.shapes[key] != tuple(params[name].shape):
            mismatched.append(f"{key} (weights {list(source.shapes[key])}, config {list(params[name].shape)})")
        found[name] = key
    buffers = {n for n, _ in module.named_buffers()}
    ignore = [re.compile(p) for p in (getattr(module, "_keys_to_ignore_on_load_unexpected", None) or [])]
    used = set(found.values())
    unexpected = sorted(k for k in source.keys() if k not in used and rename(k)[0] not in buffers
                        and not any(p.search(k) for p in ignore))
    if converted:
        raise ModelLoadError(
            f"the weights of '{spec}' are stored in a layout transformers converts while loading "
            f"({', '.join(converted[:3])}...); distributed PCGU reads row slices of stored tensors and "
            "cannot convert them: run single-process PCGU (biaslens unlearn pcgu) on this model")
    if missing or mismatched or unexpected:
        def some(xs):
            return ", ".join(xs[:4]) + (f" ... ({len(xs)} in all)" if len(xs) > 4 else "")

        parts = ([f"missing from the weight files: {some(missing)}"] if missing else []) + \
                ([f"shape differs from the config: {some(mismatched)}"] if mismatched else []) + \
                ([f"in the weight files but not in the config: {some(unexpected)}"] if unexpected else [])
        raise ModelLoadError(f"the weights of '{spec}' do not match its config.json: {'; '.join(parts)}; "
                             "fix config.json or save the model again")
    return found


class ShardedModel:
    """The parts of :class:`~biaslens.model.BiasModel` PCGU needs, over an FSDP2-sharded plain HF
    module: ``module`` (the sharded module), ``params`` (name → DTensor Parameter; this process
    holds only its dim-0 rows), ``tokenizer``, ``arch``, ``n_layers``, ``spec``, and the same
    tokenisation as :class:`BiasModel` (its methods). There is no TransformerBridge.

    ``shard_info()`` says how much of the model this process holds and what it read.
    """

    def __init__(self, spec: str, path: str | None, module, tokenizer, arch, prepend_bos: bool, reads: _Rows):
        dist = _dist()
        self.spec, self.path, self.module, self.hf = spec, path, module, module
        self.tokenizer, self.arch, self.prepend_bos = tokenizer, arch, bool(prepend_bos)
        self.params = dict(module.named_parameters())
        self.n_layers: int = int(module.config.num_hidden_layers)
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self._source = reads

    # the tokenisation of BiasModel, unchanged (it needs only tokenizer, prepend_bos, hf.config, spec)
    def tokenize(self, texts, offsets: bool = False, length: str = "check"):
        from biaslens.model import BiasModel

        return BiasModel.tokenize(self, texts, offsets=offsets, length=length)

    def continuation_ids(self, context: str, word: str) -> list[int]:
        from biaslens.model import BiasModel

        return BiasModel.continuation_ids(self, context, word)

    @property
    def max_positions(self) -> int | None:
        from biaslens.model import BiasModel

        return BiasModel.max_positions.fget(self)

    @property
    def device(self):
        return next(iter(self.params.values())).device

    @property
    def dtype(self):
        return next(iter(self.params.values())).dtype

    def param(self, name: str):
        try:
            return self.params[name]
        except KeyError:
            raise KeyError(f"no parameter '{name}' in {self.spec}") from None

    def __repr__(self) -> str:
        return f"ShardedModel({self.spec!r}, rank {self.rank} of {self.world}, layers={self.n_layers})"

    # ------------------------------------------------------------ weights (local shards)
    def snapshot(self, names: Sequence[str] | None = None) -> dict[str, "torch.Tensor"]:
        """Copies of this process's rows of the named parameters (DTensors)."""
        names = list(self.params) if names is None else list(names)
        return {n: self.param(n).detach().clone() for n in names}

    def restore(self, snapshot: dict[str, "torch.Tensor"]) -> None:
        import torch

        with torch.no_grad():
            for n, t in snapshot.items():
                self.param(n).to_local().copy_(t.to_local())

    def check_finite(self, names: Sequence[str] | None = None) -> list[str]:
        """Names of parameters holding NaN or inf on any process (collective)."""
        import torch

        names = list(self.params) if names is None else list(names)
        bad = torch.tensor([0 if torch.isfinite(self.param(n).to_local()).all() else 1 for n in names],
                           dtype=torch.int32, device=self.device)
        _dist().all_reduce(bad, op=_dist().ReduceOp.MAX)
        return [n for n, b in zip(names, bad.tolist()) if b]

    def delta_since(self, snapshot: dict[str, "torch.Tensor"], **info) -> "ShardedDelta":
        """A :class:`ShardedDelta` of what changed since ``snapshot`` (collective)."""
        return ShardedDelta.from_snapshot(self, snapshot, **info)

    def shard_info(self) -> dict[str, Any]:
        """This process's share: parameters it holds, elements it read from the checkpoint, and
        how many tensors with more than one row it read whole (0 unless a tensor has fewer rows
        than there are processes)."""
        local = sum(p.to_local().numel() for p in self.params.values())
        total = sum(p.numel() for p in self.params.values())
        read = whole = 0
        for name, start, stop, n_rows in self._source.reads:
            shape = self._source.shapes[name]
            read += (stop - start) * math.prod(shape[1:])
            whole += int(stop - start == n_rows and n_rows > 1)
        return {"rank": self.rank, "local_params": local, "params": total, "read_elements": read,
                "whole_tensors_read": whole, "reads": len(self._source.reads)}

    # ------------------------------------------------------------ construction
    @classmethod
    def build(cls, spec: str, path: str | None, config, tokenizer, source: _Rows, device: str = "cpu",
              dtype: Any = "float32", prepend_bos: bool | None = None) -> "ShardedModel":
        """Build the module on meta, shard it with FSDP2, allocate and fill only this process's
        rows from ``source`` (collective: every process of the group calls it)."""
        import torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from biaslens.arch import arch_for
        from biaslens.model import as_torch_dtype

        dist = _dist()
        world, rank = dist.get_world_size(), dist.get_rank()
        arch = arch_for(config.model_type)
        torch_dtype = as_torch_dtype(dtype)
        module = _skeleton(config, torch_dtype)
        keys = _match_keys(module, source, spec)
        aliases = _aliases(module)
        mesh = init_device_mesh(torch.device(device).type, (world,))
        for layer in range(int(config.num_hidden_layers)):
            fully_shard(module.get_submodule(arch.block.format(layer=layer)), mesh=mesh)
        fully_shard(module, mesh=mesh)
        # to_empty would leave the real buffers uninitialised too: keep them and put them back
        buffers = [(m, n, b) for m in module.modules() for n, b in m._buffers.items() if b is not None]
        module.to_empty(device=device)
        for m, n, b in buffers:
            m._buffers[n] = b.to(device)
        params = dict(module.named_parameters())
        broken = [o for name, others in aliases.items() for o in others[1:]
                  if module.get_parameter(o) is not params[name]]
        if broken:  # to_empty keeps tied weights one Parameter; FSDP relies on it
            raise RuntimeError(f"materialising the sharded module untied {broken[0]}; "
                               "this torch version is not supported by distributed PCGU")
        with torch.no_grad():
            for name, p in params.items():
                local = p.to_local()
                start, stop = shard_rows(p.shape[0], world, rank)
                if local.shape[0] != stop - start:
                    raise RuntimeError(f"FSDP gave rank {rank} {local.shape[0]} rows of {name}, "
                                       f"not the torch.chunk block {start}:{stop}")
                if stop > start:
                    local.copy_(source.rows(keys[name], start, stop).to(device=local.device, dtype=local.dtype))
        if prepend_bos is None:  # as biaslens.load decides
            ids = tokenizer("a")["input_ids"]
            bos = tokenizer.bos_token_id
            prepend_bos = bos is not None and (not ids or ids[0] != bos)
        return cls(spec, path, module.eval(), tokenizer, arch, prepend_bos, source)

    @classmethod
    def from_model(cls, model: "BiasModel") -> "ShardedModel":
        """This process's rows of an already loaded model (collective)."""
        src = _TensorRows(dict(model.params))
        return cls.build(model.spec, model.path, model.hf.config, model.tokenizer, src,
                         device=str(model.device), dtype=model.dtype, prepend_bos=model.prepend_bos)


def _local_folder(spec: str) -> tuple[str, Path, bool]:
    """``(name, folder, is_local)`` of a model spec; a hub name is resolved to its cached snapshot
    (config, tokenizer and safetensors files only)."""
    from biaslens.model import resolve_spec

    name, is_local = resolve_spec(spec)
    if is_local:
        return name, Path(name), True
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                         "tokenizer*"])
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, network: one clear message
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = ("the hub is unreachable (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline
                else "it is not a local folder and could not be fetched from the hub")
        raise ModelLoadError(f"cannot load model '{spec}': {hint}; pass a local Hugging Face folder or "
                             f"'organism' ({type(exc).__name__})") from None
    return name, Path(folder), False


def load_sharded(spec: str | os.PathLike, device: str = "cpu", dtype: Any = "float32",
                 prepend_bos: bool | None = None) -> ShardedModel:
    """``spec`` (``"organism"``, a hub name or a local HF folder with safetensors weights) as a
    :class:`ShardedModel`: built on meta, this process's rows read from the checkpoint (collective:
    every process of the initialised group calls it)."""
    import logging

    import transformers
    from transformers import AutoConfig, AutoTokenizer

    _dist()
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    name, folder, is_local = _local_folder(str(spec))
    try:
        config = AutoConfig.from_pretrained(str(folder))
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load '{spec}': {type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.bos_token
    source = _CheckpointRows(folder, str(spec))
    return ShardedModel.build(str(spec), name if is_local else None, config, tokenizer, source,
                              device=device, dtype=dtype, prepend_bos=prepend_bos)


# ----------------------------------------------------------------------------- the sharded result


def _gather_rows(local: "torch.Tensor", n_rows: int, dst: int = 0) -> "torch.Tensor | None":
    """The whole tensor on ``dst`` from every process's dim-0 block (``None`` elsewhere;
    collective). Blocks are padded to the FSDP block size and received into one buffer."""
    import torch

    dist = _dist()
    world, rank = dist.get_world_size(), dist.get_rank()
    chunk = math.ceil(n_rows / world)
    rest = tuple(local.shape[1:])
    block = local.contiguous()
    if block.shape[0] != chunk:
        block = torch.cat([block, block.new_zeros((chunk - block.shape[0], *rest))])
    if rank == dst:
        full = torch.empty((chunk * world, *rest), dtype=local.dtype, device=local.device)
        dist.gather(block, gather_list=list(full.split(chunk)), dst=dst)
        return full[:n_rows]
    dist.gather(block, dst=dst)
    return None


_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def _stream_safetensors(path: Path | None, entries: Sequence[tuple[str, Sequence[int], "torch.dtype"]],
                        metadata: dict[str, str], tensors: Iterator["torch.Tensor | None"]) -> None:
    """Write a safetensors file whose tensors arrive one at a time from ``tensors`` (in ``entries``
    order; ``None`` on processes that do not write, where ``path`` is ``None``). The header
    (format: 8-byte little-endian length, JSON, 8-byte aligned) is known in advance from the shapes."""
    import struct

    import torch

    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    at = 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[str(dtype).replace("torch.", "")], "shape": list(shape),
                        "data_offsets": [at, at + size]}
        at += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f = open(path, "wb") if path is not None else None
    try:
        if f is not None:
            f.write(struct.pack("<Q", len(raw)) + raw)
        for (name, shape, dtype), t in zip(entries, tensors):
            if f is not None:
                if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise RuntimeError(f"tensor {name} did not arrive as {list(shape)} {dtype}")
                f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    finally:
        if f is not None:
            f.close()


@dataclass
class ShardedDelta:
    """A :class:`~biaslens.delta.WeightDelta` whose tensors stay sharded: ``original`` and
    ``updated`` hold this process's rows (DTensors) of each changed tensor. ``names``, ``stats()``
    and ``manifest()`` are the same on every process (the statistics are reduced once, when the
    delta is made); :meth:`save`, :meth:`gather` and :meth:`to_delta` are collective."""

    original: dict[str, "torch.Tensor"]
    updated: dict[str, "torch.Tensor"]
    method: str = ""
    hparams: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    _stats: list[dict[str, Any]] = field(default_factory=list, repr=False)
    _names: list[str] = field(default_factory=list, repr=False)
    released: bool = False

    def __post_init__(self):
        if not self._names:
            self._names = sorted(self.original)

    @classmethod
    def from_snapshot(cls, model: ShardedModel, snapshot: dict[str, "torch.Tensor"], method: str = "",
                      hparams: dict | None = None, info: dict | None = None) -> "ShardedDelta":
        import torch

        dist = _dist()
        names = list(snapshot)
        moved = torch.tensor([0 if torch.equal(snapshot[n].to_local(), model.param(n).detach().to_local()) else 1
                              for n in names], dtype=torch.int32, device=model.device)
        dist.all_reduce(moved, op=dist.ReduceOp.MAX)  # a tensor may change on one process's rows only
        changed = [n for n, m in zip(names, moved.tolist()) if m]
        original = {n: snapshot[n] for n in changed}  # the snapshot is the caller's private copy
        updated = {n: model.param(n).detach().clone() for n in changed}
        info = dict(info or {})
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, model.shard_info())
        info["ranks"] = ranks
        delta = cls(original, updated, method, dict(hparams or {}), info)
        delta._stats = delta._reduce_stats()
        return delta

    def _reduce_stats(self) -> list[dict[str, Any]]:
        import torch

        dist = _dist()
        if not self.names:
            return []
        sums, peaks = [], []
        for n in self.names:
            o = self.original[n].to_local().double()
            d = self.updated[n].to_local().double() - o
            sums.append(torch.stack([d.square().sum(), o.square().sum(), (d != 0).sum().double()]))
            peaks.append(d.abs().max() if d.numel() else d.new_zeros(()))
        sums, peaks = torch.stack(sums), torch.stack(peaks).float()
        dist.all_reduce(sums)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        out = []
        for n, (sq, osq, cnt), peak in zip(self.names, sums.tolist(), peaks.tolist()):
            out.append({"name": n, "shape": list(self.original[n].shape), "l2": math.sqrt(sq),
                        "relative_l2": math.sqrt(sq) / max(math.sqrt(osq), 1e-12), "max_abs": peak,
                        "changed_entries": int(cnt)})
        return out

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def stats(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self._stats]

    def manifest(self) -> dict[str, Any]:
        return {"method": self.method, "hyperparameters": self.hparams, "changed_tensors": self.stats(),
                **self.info}

    def gather(self, name: str, which: str = "diff", dst: int = 0) -> "torch.Tensor | None":
        """One whole tensor on process ``dst`` (``None`` elsewhere; collective): ``"updated"``,
        ``"original"`` or ``"diff"`` (``updated - original`` in float32, as
        :meth:`WeightDelta.tensors`)."""
        self._check_held()
        if which == "diff":
            local = self.updated[name].to_local().float() - self.original[name].to_local().float()
        elif which in ("updated", "original"):
            local = getattr(self, which)[name].to_local()
        else:
            raise ValueError(f"which must be 'diff', 'updated' or 'original', not {which!r}")
        return _gather_rows(local, self.original[name].shape[0], dst)

    def save(self, path: str | Path, dst: int = 0) -> None:
        """Write ``delta.safetensors`` (the differences, float32, with the method and
        hyperparameters as metadata — the file :meth:`WeightDelta.save` writes) on process ``dst``,
        receiving one tensor at a time (collective: every process calls it)."""
        import torch

        rank = _dist().get_rank()
        entries = [(n, tuple(self.original[n].shape), torch.float32) for n in self.names]
        meta = {"method": self.method, "hparams": json.dumps(self.hparams, default=str)}
        _stream_safetensors(Path(path) if rank == dst else None, entries, meta,
                            (self.gather(n, "diff", dst) for n in self.names))

    def to_delta(self, model: "BiasModel | None" = None, dst: int | None = 0,
                 release: bool = False) -> "WeightDelta | None":
        """A whole :class:`~biaslens.delta.WeightDelta` on process ``dst`` (on every process with
        ``dst=None``; ``None`` elsewhere; collective). ``model``, given on ``dst`` (on every process
        with ``dst=None``), is a loaded copy of the *original* weights: its changed tensors are
        updated in place and the delta's originals are taken from it rather than received.
        ``release`` drops this delta's rows of each tensor once it is sent (for an export that
        needs the memory; the delta can then no longer be saved or gathered)."""
        import torch

        from biaslens.delta import WeightDelta

        dist = _dist()
        rank = dist.get_rank()
        mine = dst is None or rank == dst
        flag = [model is not None]
        if dst is not None:
            dist.broadcast_object_list(flag, src=dst)  # every process must gather the same tensors
        use_model = flag[0]
        if mine and use_model and model is None:
            raise ValueError("pass the model on every process with dst=None")
        if self.released:
            raise BiasLensError("this delta's rows were already released by to_delta(release=True)")
        original, updated = {}, {}
        for n in self.names:
            if dst is None:
                up = self.updated[n].full_tensor()
                orig = None if use_model else self.original[n].full_tensor()
            else:
                up = self.gather(n, "updated", dst)
                orig = None if use_model else self.gather(n, "original", dst)
            if release:
                del self.original[n], self.updated[n]
            if not mine:
                continue
            if use_model:
                orig = model.param(n).detach().clone()
                with torch.no_grad():
                    model.param(n).copy_(up)
            original[n], updated[n] = orig, up
        self.released = self.released or release
        if not mine:
            return None
        return WeightDelta(original, updated, self.method, dict(self.hparams), dict(self.info))

    def undo(self, model: ShardedModel) -> None:
        """Restore the original rows in ``model`` (each process its own)."""
        self._check_held()
        model.restore(self.original)

    def apply(self, model: ShardedModel) -> None:
        self._check_held()
        model.restore(self.updated)

    def _check_held(self) -> None:
        if self.released:
            raise BiasLensError("this delta's rows were released by to_delta(release=True); "
                                "undo or apply it before releasing")

    def __repr__(self) -> str:
        return f"ShardedDelta(method={self.method!r}, tensors={len(self.names)})"


# ----------------------------------------------------------------------------- the method


def pcgu_fsdp(
    model: "ShardedModel | BiasModel | str | os.PathLike",
    pairs: Sequence["ContrastPair"],
    *,
    k: int = 10_000,
    lr: float = 1e-5,
    batch_size: int = 16,
    epochs: int = 1,
    max_steps: int | None = None,
    partition: str = "rows",
    variant: str = "advantaged",
    form: str = "sentence",
    params: Sequence[str] | str | None = None,
    effect_map: "EffectMap | str | os.PathLike | None" = None,
    optimizer: str = "sgd",
    seed: int = 0,
    progress: bool = True,
    n_sites: int = 5,
) -> "ShardedDelta | WeightDelta":
    """:func:`biaslens.unlearn.pcgu` under FSDP, in every process of an initialised process group.

    Same arguments; the selection uses all-reduced per-unit statistics, so the same units are
    stepped and the weights end the same as in one process.

    * ``model`` a :class:`ShardedModel` (or a spec, loaded with :func:`load_sharded`): no process
      holds the whole model; returns a :class:`ShardedDelta` and leaves the shards updated.
    * ``model`` a loaded :class:`~biaslens.model.BiasModel` (every process already holds it all):
      the training runs on a sharded copy; every process gets the same whole
      :class:`~biaslens.delta.WeightDelta` and ``model`` updated with the gathered weights.
    """
    cfg = PCGUConfig(k=k, lr=lr, batch_size=batch_size, epochs=epochs, max_steps=max_steps, partition=partition,
                     variant=variant, form=form, optimizer=optimizer, seed=seed)
    engine = FSDPEngine()
    if isinstance(model, (str, os.PathLike)):
        model = load_sharded(model)
    if isinstance(model, ShardedModel):
        return run(model, pairs, cfg, engine, params=params, effect_map=effect_map, n_sites=n_sites,
                   progress=progress)
    sharded = ShardedModel.from_model(model)
    delta = run(sharded, pairs, cfg, engine, params=params, effect_map=effect_map, n_sites=n_sites,
                progress=progress)
    del sharded
    return delta.to_delta(model, dst=None)


# ----------------------------------------------------------------------------- torchrun entry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m torch.distributed.run --nproc_per_node=N -m biaslens.unlearn.distributed",
                                description="Distributed PCGU (FSDP, gloo on CPU / nccl on GPU).")
    p.add_argument("--model", required=True,
                   help="'organism', 'organism-llama', a hub name or a local HF folder (safetensors)")
    p.add_argument("--pairs", default="organism",
                   help="'organism', a Winogender folder, CrowS-Pairs .csv, StereoSet .json/.jsonl or pairs .jsonl")
    p.add_argument("--bias-type", default=None, help="keep one bias type (CrowS-Pairs, StereoSet)")
    p.add_argument("--k", type=int, default=10_000)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--partition", default="rows", choices=["rows", "columns"])
    p.add_argument("--variant", default="advantaged", choices=["advantaged", "disadvantaged", "both"])
    p.add_argument("--form", default="sentence", choices=["sentence", "token"])
    p.add_argument("--params", default=None,
                   help="blocks | mlp | attn, or comma-separated parameter names (default: all)")
    p.add_argument("--effects", default=None, help="an effects.json to restrict to its top sites")
    p.add_argument("--n-sites", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="export folder (written by rank 0, which then loads the whole model once)")
    p.add_argument("--delta", default=None, help="write only delta.safetensors + history JSON here (rank 0)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--backend", default=None, help="gloo (CPU, default) or nccl")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    return p


def main(argv: list[str] | None = None) -> int:
    import sys

    import torch.distributed as dist

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fixed_mmap_threshold()
    args = _parser().parse_args(argv)
    if "RANK" not in os.environ:
        print("run this under torchrun: python -m torch.distributed.run --nproc_per_node=N "
              "-m biaslens.unlearn.distributed ...", file=sys.stderr)
        return 2
    backend = args.backend or ("nccl" if args.device.startswith("cuda") else "gloo")
    dist.init_process_group(backend)
    try:
        return _run(args, dist.get_rank())
    except BiasLensError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()


def fixed_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Keep glibc's ``malloc`` from raising its mmap threshold (``mallopt(M_MMAP_THRESHOLD)``),
    unless ``MALLOC_MMAP_THRESHOLD_`` is set; True when set here.

    FSDP allocates and frees a block's gathered weights and gradients at every layer. By default
    glibc raises the threshold to the size of each freed mmap'd buffer (up to 32 MiB), so later
    buffers of up to that size come from the heap, where freed ones are kept: on a GPT-2-shaped
    model that kept ~0.5 GB more per rank than the live tensors (docs/results/fsdp_memory.md).
    With the threshold fixed at glibc's default 128 KiB, buffers above it are returned to the
    system when freed. Does nothing on other C libraries."""
    import ctypes
    import ctypes.util
    import sys

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _params_arg(value: str | None):
    if value is None or value in ("blocks", "mlp", "attn"):
        return value
    return value.split(",")


def _run(args, rank: int) -> int:
    import torch.distributed as dist

    from biaslens.export import check_out_dir
    from biaslens.unlearn.pairs import load_pairs

    if rank == 0 and args.out:
        check_out_dir(args.out, args.force)
    device = args.device
    if device.startswith("cuda"):
        import torch

        device = f"cuda:{rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    pairs = load_pairs(args.pairs, args.bias_type)
    effect_map = None
    if args.effects:
        from biaslens.locate import EffectMap

        effect_map = EffectMap.load(args.effects)
    model = load_sharded(args.model, device=device, dtype=args.dtype)
    delta = pcgu_fsdp(model, pairs, k=args.k, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
                      max_steps=args.max_steps, partition=args.partition, variant=args.variant,
                      form=args.form, params=_params_arg(args.params),
                      effect_map=effect_map, seed=args.seed, n_sites=args.n_sites)
    del model  # the delta keeps its own copies of the changed rows
    if args.delta:
        out = Path(args.delta)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        delta.save(out / "delta.safetensors")
        if rank == 0:
            (out / "history.json").write_text(json.dumps(delta.manifest(), indent=1, default=str) + "\n")
    if args.out:
        _export(args, rank, delta, device)
    if rank == 0:
        last = delta.info["history"][-1] if delta.info["history"] else {}
        print(json.dumps({"steps": len(delta.info["history"]), "changed": delta.names,
                          "last_loss_gap": last.get("loss_gap"), "seconds": round(delta.info["seconds"], 2)}))
    dist.barrier()
    return 0


def _export(args, rank: int, delta: ShardedDelta, device: str) -> None:
    """The edited model as a Hugging Face folder (:func:`biaslens.export.export`): rank 0 loads
    the original weights once more (the export writes and verifies whole tensors), receives the
    updated tensors one at a time, and exports; the other processes only send their rows."""
    base = None
    if rank == 0:
        import biaslens

        base = biaslens.load(args.model, device=device, dtype=args.dtype)
    whole = delta.to_delta(base, dst=0, release=True)
    if rank == 0:
        from biaslens.export import export

        export(base, args.out, delta=whole, force=args.force,
               manifest={"pairs": str(args.pairs), "world_size": delta.info["world_size"]})


if __name__ == "__main__":
    import sys

    code = main()
    # Leave without interpreter finalisation. The process group is destroyed and every output
    # written by now, but the FSDP device mesh and the delta's DTensors still hold gloo objects,
    # which finalisation then tears down from its worker threads: once in a fresh-clone suite
    # run, rank 1 aborted there ("terminate called without an active exception", SIGABRT) after
    # the export was complete, and torchrun failed the whole run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
