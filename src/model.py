"""The one hooked-model abstraction every biaslens method uses.

:class:`BiasModel` wraps a TransformerLens 4.x ``TransformerBridge`` over a real Hugging Face
causal LM. The bridge's parameters *are* the HF module's parameters, so a weight edit made here is
an edit of the HF model, and hooks see raw HF numerics (no weight folding).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from biaslens.arch import ArchSpec, arch_for
from biaslens.errors import BiasLensError, ExportError, ModelLoadError, VocabularyError
from biaslens.hooks import act_name
from biaslens.prompts import (Prompt, TokenBatch, as_prompt, pad_rows, roles_from_offsets,
                              subject_span)

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float

__all__ = ["DTYPES", "as_torch_dtype", "resolve_spec", "load", "placement_defaults",
           "resolve_placement", "Placement", "state_dict_copy", "meta_module", "fresh_module",
           "tied_aliases", "reference_module", "logits_where", "last_position_mask", "BiasModel", "require_single_model"]

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}


def as_torch_dtype(dtype: Any):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}' (use one of: {', '.join(DTYPES)})")
    return getattr(torch, DTYPES[dtype])


def resolve_spec(spec: str | os.PathLike) -> tuple[str, bool]:
    """Return ``(name_or_path, is_local)`` for a model spec, or raise a clear ModelLoadError."""
    spec = str(spec)
    from biaslens.organism import ORGANISMS

    if spec in ORGANISMS:  # "organism", "organism-llama"
        return str(ORGANISMS[spec]), True
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise ModelLoadError(
                f"'{spec}' is not a Hugging Face model folder (no config.json); "
                "give a folder written by save_pretrained or `biaslens export`"
            )
        return str(path), True
    looks_local = spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1
    if looks_local or spec.endswith(os.sep):
        raise ModelLoadError(
            f"model folder '{spec}' does not exist; pass an existing folder, a hub name, 'organism' "
            "or 'organism-llama'"
        )
    return spec, False


def load(
    spec: str | os.PathLike,
    device: str = "cpu",
    dtype: Any = "float32",
    prepend_bos: bool | None = None,
    allow_mismatch: bool = False,
    device_map: str | dict | None = None,
    max_memory: int | str | dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> "BiasModel":
    """Load ``spec`` (``"organism"``, ``"organism-llama"``, a hub name, or a local HF folder) as a
    :class:`BiasModel`.

    The weights must match the config: missing, unexpected or wrongly shaped tensors (which
    transformers would initialise at random or drop) raise :class:`ModelLoadError` naming them,
    unless ``allow_mismatch=True``. An unreadable weight file raises it naming the file.

    ``device_map``, ``max_memory``, ``offload_folder``: load through accelerate's big-model
    inference (``from_pretrained(device_map=...)``) a model larger than memory; see
    docs/offload.md. ``device_map`` is ``"auto"`` (also implied by the other two),
    ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` or a dict module -> device (a GPU
    number, ``"cpu"``, ``"disk"``); ``max_memory`` one size (every GPU's budget, or the CPU's on a
    machine without one) or a dict device -> size (``{0: "20GiB", "cpu": "60GiB"}``);
    ``offload_folder`` a folder where biaslens makes its own subfolder for the weights transformers
    re-saves and the edited copies of offloaded weights (removed when the model is freed; nothing
    else in the folder is touched). Give these or ``device``, not both.
    """
    name, is_local = resolve_spec(spec)
    torch_dtype = as_torch_dtype(dtype)
    placement = resolve_placement(spec, device, device_map, max_memory, offload_folder)
    import logging
    import warnings

    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)  # "offloaded to disk" notice
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "the hub is unreachable (HF_HUB_OFFLINE=1) and it is not in the local cache"
            if offline
            else "it is not a local folder and could not be fetched from the hub"
        )
        raise ModelLoadError(
            f"cannot load model '{spec}': {hint}; pass a local Hugging Face folder, 'organism' or 'organism-llama' "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        ) from None
    arch = arch_for(config.model_type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of '{spec}': {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.bos_token
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            try:
                hf, loading = AutoModelForCausalLM.from_pretrained(
                    name, dtype=torch_dtype, attn_implementation="eager", output_loading_info=True,
                    ignore_mismatched_sizes=True,  # reported below, by name
                    **(placement.from_pretrained_kwargs() if placement else {}),
                )
            except _read_errors() as exc:  # evaluated only when something was raised
                if placement is not None and isinstance(exc, ValueError):
                    raise ModelLoadError(placement.refusal(spec, exc)) from None
                raise ModelLoadError(_unreadable(spec, name, is_local, exc)) from None
            if not allow_mismatch:
                _check_loading(spec, hf, loading)
            hf.eval()
            params = dict(hf.named_parameters())
            buffers = dict(hf.named_buffers())  # HF names, recorded before the bridge wraps modules
            slots = _slots(hf, params)  # the modules owning them, found by HF name before the bridge
            from transformer_lens.model_bridge import TransformerBridge

            if placement is not None:
                placement.attach(hf)
            try:
                bridge = TransformerBridge.boot_transformers(
                    name, hf_model=hf, tokenizer=tokenizer, device=None if placement else device,
                    dtype=torch_dtype,
                )
            except ValueError as exc:
                if placement is None:
                    raise
                raise ModelLoadError(placement.refusal(spec, exc, bridge=True)) from None
        except BaseException:
            if placement is not None:
                placement.discard()
            raise
    bridge.eval()
    return BiasModel(
        spec=str(spec), path=name if is_local else None, hf=hf, bridge=bridge,
        tokenizer=tokenizer, arch=arch, params=params, prepend_bos=prepend_bos, buffers=buffers,
        slots=slots, placement=placement,
    )


# ------------------------------------------------------------------ placement (accelerate)

#: set by the CLI around a command: the ``--device-map``/``--max-memory``/``--offload-folder`` of
#: the model it names (see :func:`placement_defaults`)
_CLI_PLACEMENT: "contextvars.ContextVar[tuple[str | None, dict] | None]" = contextvars.ContextVar(
    "biaslens_placement", default=None)


@contextlib.contextmanager
def placement_defaults(spec: str | None, **placement: Any):
    """Within the block, :func:`load` of ``spec`` (of any model when ``spec`` is None) called
    without ``device_map``/``max_memory``/``offload_folder`` uses ``placement`` (the CLI's shared
    ``--device-map``, ``--max-memory`` and ``--offload-folder`` flags reach the model a command
    names this way, and not the small helper models a method may load)."""
    token = _CLI_PLACEMENT.set((None if spec is None else str(spec), placement))
    try:
        yield
    finally:
        _CLI_PLACEMENT.reset(token)


def _n_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _gpu_of(device: Any) -> int | None:
    if isinstance(device, bool):
        return None
    if isinstance(device, int):
        return device
    d = str(device)
    return int(d[5:]) if d.startswith("cuda:") and d[5:].isdigit() else None


def resolve_placement(spec, device: Any, device_map: Any, max_memory: Any,
                      offload_folder: Any) -> "Placement | None":
    """Check the placement arguments of :func:`load` before anything loads; None for a model
    loaded whole onto ``device``. Bad values raise :class:`ModelLoadError` saying what is allowed."""
    import argparse

    from biaslens import cliargs

    if device_map is None and max_memory is None and offload_folder is None:
        cli = _CLI_PLACEMENT.get()
        if cli is None or (cli[0] is not None and cli[0] != str(spec)):
            return None
        device_map, max_memory, offload_folder = (cli[1].get(k) for k in
                                                  ("device_map", "max_memory", "offload_folder"))
        if device_map is None and max_memory is None and offload_folder is None:
            return None
    if device not in (None, "cpu"):
        raise ModelLoadError(
            f"give a device ('{device}') or a device map, not both: a device map (device_map, "
            "max_memory, offload_folder; --device-map, --max-memory, --offload-folder) places the "
            "model itself")

    def bad(what: str, exc: Exception) -> ModelLoadError:
        return ModelLoadError(f"{what} {exc}")

    n_gpu = _n_gpus()
    if device_map is None:
        device_map = "auto"
    if isinstance(device_map, str):
        try:
            device_map = cliargs.device_map(device_map)
        except argparse.ArgumentTypeError as exc:
            raise bad("device_map", exc) from None
    elif isinstance(device_map, dict):
        norm: dict[str, int | str] = {}
        for k, v in device_map.items():
            if not isinstance(k, str):
                raise ModelLoadError(f"device_map keys must be module names (strings), not {k!r}")
            try:
                norm[k] = v if isinstance(v, int) and not isinstance(v, bool) else cliargs._map_device(str(v))
            except argparse.ArgumentTypeError as exc:
                raise bad(f"device_map[{k!r}]", exc) from None
        device_map = norm
    else:
        raise ModelLoadError(
            f"device_map must be one of {', '.join(cliargs.DEVICE_MAP_STRATEGIES)} or a dict module -> "
            f"device, not {type(device_map).__name__}")
    if max_memory is not None:
        try:
            if isinstance(max_memory, dict):
                mm: dict[int | str, int] = {}
                for k, v in max_memory.items():
                    key = k if isinstance(k, int) and not isinstance(k, bool) else cliargs._memory_key(str(k))
                    mm[key] = v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else cliargs.size_bytes(str(v))
                max_memory = mm
            else:
                size = (max_memory if isinstance(max_memory, int) and not isinstance(max_memory, bool)
                        and max_memory > 0 else cliargs.size_bytes(str(max_memory)))
                max_memory = {i: size for i in range(n_gpu)} if n_gpu else {"cpu": size}
        except argparse.ArgumentTypeError as exc:
            raise bad("max_memory", exc) from None
    named = [d for d in (list(device_map.values()) if isinstance(device_map, dict) else [])
             + list(max_memory or {}) if _gpu_of(d) is not None]
    missing = sorted({_gpu_of(d) for d in named if _gpu_of(d) >= n_gpu})
    if missing:
        raise ModelLoadError(
            f"the placement names GPU {', '.join(map(str, missing))} but this machine has "
            f"{n_gpu or 'no'} GPU{'s' if n_gpu != 1 else ''}; use cpu and disk, or the GPUs it has")
    folder = None
    if offload_folder is not None:
        folder = Path(os.path.abspath(Path(offload_folder).expanduser()))
        if folder.exists() and not folder.is_dir():
            raise ModelLoadError(f"offload folder '{offload_folder}' is a file; give a folder "
                                 "(biaslens makes its own subfolder in it)")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelLoadError(f"cannot create offload folder '{offload_folder}' "
                                 f"({exc.strerror or exc}); give a writable folder") from None
        from biaslens.io import OutputError, probe_writable

        try:
            probe_writable(folder, "offload_folder (--offload-folder)", "offload")
        except OutputError as exc:
            raise ModelLoadError(str(exc)) from None
    return Placement(device_map, max_memory, folder)


class Placement:
    """A model placed by accelerate: what :func:`load` passed to ``from_pretrained`` and the
    scratch folder biaslens owns.

    The scratch folder is a new hidden subfolder of ``offload_folder``
    (``.offload.tmp-PID-XXXX``) holding what transformers re-saves for offloading and the edited
    copies of disk-offloaded weights (:meth:`BiasModel.mlp_out_matrix`). Nothing else in
    ``offload_folder`` is written or removed, except such subfolders of runs whose process is
    gone (:func:`biaslens.io.clean_stale`). The subfolder goes when the model is freed, or
    at exit. Without ``offload_folder``, edited copies go to a temporary folder.
    """

    def __init__(self, device_map, max_memory, offload_folder: Path | None):
        self.device_map, self.max_memory, self.offload_folder = device_map, max_memory, offload_folder
        self.scratch: Path | None = None
        self._edits: Path | None = None
        self._owner = None  # weakref to the HF model whose files the scratch folder holds

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"device_map": self.device_map}
        if self.max_memory is not None:
            kw["max_memory"] = dict(self.max_memory)
        if self.offload_folder is not None:
            import tempfile

            from biaslens.io import clean_stale

            clean_stale(self.offload_folder, "offload")
            self.scratch = Path(tempfile.mkdtemp(prefix=f".offload.tmp-{os.getpid()}-",
                                                 dir=self.offload_folder))
            kw["offload_folder"] = str(self.scratch)
        return kw

    def attach(self, hf) -> None:
        """Remove the scratch folder when ``hf`` (which reads from it) is freed, or at exit."""
        import weakref

        self._owner = weakref.ref(hf)
        if self.scratch is not None:
            weakref.finalize(hf, _rmtree, self.scratch)

    def discard(self) -> None:
        for d in (self._edits, self.scratch):
            if d is not None:
                _rmtree(d)

    def edits_folder(self) -> Path:
        """Where edited copies of disk-offloaded weights are written (made on first use)."""
        if self._edits is None:
            import tempfile
            import weakref

            if self.scratch is not None:
                self._edits = self.scratch / "edits"
                self._edits.mkdir(exist_ok=True)
            else:
                self._edits = Path(tempfile.mkdtemp(prefix="biaslens-offload-"))
                owner = self._owner() if self._owner is not None else None
                if owner is not None:
                    weakref.finalize(owner, _rmtree, self._edits)
        return self._edits

    def describe(self) -> dict[str, Any]:
        return {"device_map": self.device_map,
                "max_memory": None if self.max_memory is None else {str(k): v for k, v in self.max_memory.items()},
                "offload_folder": None if self.offload_folder is None else str(self.offload_folder)}

    def refusal(self, spec, exc: BaseException, bridge: bool = False) -> str:
        """The one-line message for a placement transformers or TransformerLens refused."""
        why = " ".join(str(exc).split())
        if len(why) > 240:  # transformers lists every unplaced parameter
            why = why[:240].rsplit(", ", 1)[0] + ", ..."
        if bridge:
            return (f"TransformerLens {_version('transformer-lens')} cannot run '{spec}' as accelerate "
                    f"placed it ({why}); on a GPU machine give the GPUs room for the whole model "
                    "(max_memory), or place all of it on cpu/disk (device_map='cpu' or 'disk')")
        if "offload_folder" in str(exc):
            return (f"cannot place '{spec}': transformers must re-save some offloaded weights and "
                    "needs a folder for them: pass offload_folder=DIR (--offload-folder DIR)")
        return (f"cannot place '{spec}' with device_map={self.device_map!r}"
                f"{'' if self.max_memory is None else f', max_memory={self.max_memory!r}'}: {why}; "
                "a device map must give every module a device, by the model's own module names "
                "(e.g. model.layers.3, lm_head, or '' for the whole model)")


def _rmtree(path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _version(pkg: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "?"


def _slots(hf, params: dict) -> dict[str, list[tuple[Any, str]]]:
    """``name -> [(module, attribute), ...]`` for each HF parameter name: where it is held (tied
    weights in several modules, the one named in ``params`` first). Found before the bridge renames
    the module tree; the module objects stay the same."""
    canonical = {id(p): n for n, p in params.items()}
    out: dict[str, list[tuple[Any, str]]] = {n: [] for n in params}
    for n, p in hf.named_parameters(remove_duplicate=False):
        owner = canonical.get(id(p))
        if owner is None:
            continue
        path, _, attr = n.rpartition(".")
        slot = (hf.get_submodule(path) if path else hf, attr)
        out[owner].insert(0, slot) if n == owner else out[owner].append(slot)
    return out


_LINKED: list = []


def _linked_parameter(like, slots: list[tuple[Any, str]]):
    """A meta stand-in, for :attr:`BiasModel.params`, of a weight accelerate offloads. accelerate
    materialises the weight for each call with the ``requires_grad`` of the placeholder its module
    holds then, and swaps placeholders every call; ``requires_grad_`` on the stand-in sets it on
    the placeholders its modules hold now, so freezing ``model.params`` (as the edits do around
    their target optimisation) reaches the forward pass as it does for an in-memory model."""
    import torch

    if not _LINKED:
        class OffloadedParameter(torch.nn.Parameter):
            def requires_grad_(self, requires_grad: bool = True):
                super().requires_grad_(requires_grad)
                for mod, attr in self._biaslens_slots:
                    live = mod._parameters.get(attr)
                    if live is not None and live is not self and live.is_leaf:
                        live.requires_grad_(requires_grad)
                return self

        _LINKED.append(OffloadedParameter)
    p = _LINKED[0](torch.empty(like.shape, dtype=like.dtype, device="meta"),
                   requires_grad=like.requires_grad)
    p._biaslens_slots = list(slots)
    return p


def _offload_hook(module):
    """The accelerate ``AlignDevicesHook`` that offloads ``module``'s own weights, or None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def _offload_table(slots: dict) -> dict[str, tuple[Any, str]]:
    """``name -> (mapping, key)`` for each weight accelerate keeps outside its module (the module
    holds a meta tensor; the values live in the hook's ``weights_map``: in memory, or on disk
    through its ``OffloadedWeightsLoader``)."""
    out = {}
    for n, held in slots.items():
        if not held:
            continue
        mod, attr = held[0]
        hook = _offload_hook(mod)
        if hook is None:
            continue
        wm = hook.weights_map
        prefix = getattr(wm, "prefix", None)
        ds, key = (wm.dataset, prefix + attr) if prefix is not None and hasattr(wm, "dataset") else (wm, attr)
        if key in ds:
            out[n] = (ds, key)
    return out


def _bridge_copies(hf, params: dict) -> set[str]:
    """HF weights the bridge runs through tensors of its own (copies made at boot, e.g. GPT-2's
    fused ``c_attn`` split into q/k/v when it is offloaded); an edit of them would not reach the
    forward pass. In-memory models get views instead, so nothing is listed for them."""
    recorded = {id(p) for p in params.values()}
    storages = {p.untyped_storage().data_ptr() for p in params.values() if not p.is_meta}
    owners = set()
    for bn, p in hf.named_parameters():
        if id(p) in recorded or p.is_meta or p.untyped_storage().data_ptr() in storages:
            continue
        plain = bn.replace("._original_component", "")
        owners.add(plain.rsplit(".", 2)[0])
    return {n for n in params if any(n.startswith(o + ".") for o in owners)}


#: safetensors dtype tag -> (numpy dtype of the bytes, torch dtype to view them as, or None)
_ST_DTYPES = {"F64": ("float64", None), "F32": ("float32", None), "F16": ("float16", None),
              "BF16": ("int16", "bfloat16")}


def _save_aligned(path: Path, key: str, tensor: "torch.Tensor", align: int = 64) -> None:
    """One tensor in a safetensors file, its bytes starting at a multiple of ``align`` (the
    header padded with spaces, as the format allows), like a CPU tensor's own memory. MKL's
    kernels round differently on inputs at other alignments: a disk copy at offset 40 (mod 64),
    where ``safetensors.save_file`` put it, made an offloaded model's later edits differ from the
    in-memory model's by 2.7e-5 once a weight had been written through and restored."""
    import json

    import torch

    t = tensor.detach().cpu().contiguous()
    tags = {v[1] or v[0]: k for k, v in _ST_DTYPES.items()}
    tag = tags.get(str(t.dtype).replace("torch.", ""))
    if tag is None:
        raise BiasLensError(f"cannot write the offloaded {t.dtype} weight {key}; load the model in "
                            "float32, float16 or bfloat16")
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    header = json.dumps({key: {"dtype": tag, "shape": list(t.shape), "data_offsets": [0, len(data)]}},
                        separators=(",", ":")).encode()
    header += b" " * ((-(8 + len(header))) % align)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        f.write(data)


def _safetensors_view(path: Path, key: str):
    """A writable tensor over ``key``'s bytes in the safetensors file ``path`` (a memory map:
    in-place changes are changes of the file, seen by every later read of it)."""
    import json

    import numpy as np
    import torch

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    meta = header[key]
    if meta["dtype"] not in _ST_DTYPES:
        raise BiasLensError(f"cannot edit the offloaded {meta['dtype']} weight {key} in place; "
                            "load the model in float32, float16 or bfloat16")
    np_dtype, view_as = _ST_DTYPES[meta["dtype"]]
    start, end = meta["data_offsets"]
    count = (end - start) // np.dtype(np_dtype).itemsize
    if count == 0:
        raise BiasLensError(f"cannot edit the empty offloaded weight {key}")
    arr = np.memmap(path, dtype=np_dtype, mode="r+", offset=8 + n + start, shape=(count,))
    t = torch.from_numpy(arr)
    if view_as is not None:
        t = t.view(getattr(torch, view_as))
    return t.view(tuple(meta["shape"]))


def _execution_device(hf, bridge):
    """The device a model placed by accelerate runs on (its embedding's, else the first GPU of
    the map, else the CPU); None for a model loaded whole."""
    import torch

    dm = getattr(hf, "hf_device_map", None)
    if not dm:
        return None
    cfgdev = str(getattr(bridge.cfg, "device", "") or "")
    if cfgdev and cfgdev not in ("meta", "None"):
        return torch.device(cfgdev)
    main = next((d for d in dm.values() if str(d) not in ("cpu", "disk")), "cpu")
    return torch.device(f"cuda:{main}" if isinstance(main, int) else str(main))


def _read_errors() -> tuple[type[BaseException], ...]:
    import pickle

    errors: list[type[BaseException]] = [OSError, ValueError, RuntimeError, EOFError, KeyError,
                                         pickle.UnpicklingError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - older safetensors
        pass
    return tuple(errors)


def _unreadable(spec, name: str, is_local: bool, exc: BaseException) -> str:
    """The message for weights that could not be read: the damaged file when one can be named."""
    why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
    if not is_local:
        return f"cannot read the weights of '{spec}' ({why})"
    folder = Path(name)
    files = sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    if not files:
        return (f"'{spec}' holds no weight file (model.safetensors or pytorch_model.bin); "
                "save the model with save_pretrained")
    bad = []
    for f in files:
        if f.suffix == ".safetensors":
            try:
                from safetensors import safe_open

                with safe_open(str(f), "pt"):
                    pass
            except Exception as e:  # noqa: BLE001 - any failure to open names the file
                bad.append(f"{f.name} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if bad:
        return (f"cannot read the weights of '{spec}': {'; '.join(bad)} is damaged or truncated; "
                "copy or save the model again")
    return f"cannot load the weights of '{spec}' ({', '.join(f.name for f in files)}): {why}"


def _check_loading(spec, hf, loading: dict) -> None:
    """Refuse weights that do not match the config (transformers would fill them at random)."""
    # a parameter sharing its tensor with a loaded one (tied embeddings) is not missing
    by_ptr: dict[int, list[str]] = {}
    for n, p in hf.named_parameters(remove_duplicate=False):  # offloaded (meta) ones: by object
        by_ptr.setdefault(id(p) if p.is_meta else p.data_ptr(), []).append(n)
    loaded_missing = set(loading.get("missing_keys") or ())
    tied = {n for names in by_ptr.values() if any(m not in loaded_missing for m in names)
            for n in names}
    missing = sorted(loaded_missing - tied)
    unexpected = sorted(loading.get("unexpected_keys") or ())
    mismatched = sorted(loading.get("mismatched_keys") or ())
    if not (missing or unexpected or mismatched):
        return

    def some(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" ... ({len(names)} in all)" if len(names) > 4 else "")

    parts = []
    if missing:
        parts.append(f"missing from the weight files (would be random): {some(missing)}")
    if unexpected:
        parts.append(f"in the weight files but not in the config (would be dropped): {some(unexpected)}")
    if mismatched:
        parts.append("shape differs from the config: " + some(
            [f"{k} (weights {list(a)}, config {list(b)})" for k, a, b in mismatched]))
    raise ModelLoadError(
        f"the weights of '{spec}' do not match its config.json: {'; '.join(parts)}; fix config.json "
        "(e.g. its layer count or vocabulary size) or save the model again "
        "(biaslens.load(..., allow_mismatch=True) loads it anyway)")


# ------------------------------------------------------------------ plain Hugging Face modules
# The plain HF module (no bridge wrappers) that training, FSDP and the exporter run: a model fact,
# so it lives here (docs/architecture.md).


def state_dict_copy(model: "BiasModel") -> dict[str, Any]:
    """Plain contiguous copies of every HF parameter, by its HF name (views materialised)."""
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.params.items()}


def meta_module(model: "BiasModel"):
    """A new, plain HF model of ``model``'s config with every parameter on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model.hf.config, attn_implementation="eager")


def fresh_module(model: "BiasModel", state: dict[str, Any]):
    """A new, plain HF model (no bridge wrappers) holding ``state``."""
    fresh = meta_module(model)
    fresh.load_state_dict(state, strict=False, assign=True)
    _real_buffers(model, fresh)
    missing = [n for n, p in fresh.named_parameters() if p.is_meta]
    if missing:
        fresh.tie_weights()
        missing = [n for n, p in fresh.named_parameters() if p.is_meta]
    if missing:
        raise ExportError(f"export lost parameters {missing[:5]}: unsupported model layout")
    return fresh


def _real_buffers(model: "BiasModel", fresh) -> None:
    """Buffers (position ids, rotary frequencies) are rebuilt on load; materialise any left on meta."""
    for mod_name, mod in fresh.named_modules():
        for b_name, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta:
                src = model.buffers.get(f"{mod_name}.{b_name}" if mod_name else b_name)
                if src is None:
                    raise ExportError(f"cannot rebuild buffer {mod_name}.{b_name} for export")
                mod._buffers[b_name] = src.detach().to("cpu").clone()


class _LiveWeights(Mapping):
    """HF name -> the model's current value of that weight (through
    :meth:`~biaslens.model.BiasModel.param`: from memory or from disk, when asked), tied names
    resolved to the weight they share: the ``weights_map`` accelerate's offload hooks read."""

    def __init__(self, model: "BiasModel", aliases: dict[str, str]):
        self.model, self.aliases = model, aliases

    def __getitem__(self, key: str):
        name = self.aliases.get(key, key)
        if name in self.model.params:
            return self.model.param(name).detach()
        if key in self.model.buffers:
            return self.model.buffers[key]
        raise KeyError(key)

    def __iter__(self):
        return iter([*self.model.params, *self.aliases])

    def __len__(self) -> int:
        return len(self.model.params) + len(self.aliases)


def tied_aliases(fresh, names) -> dict[str, str]:
    """Tied parameter names of ``fresh`` that are not in ``names`` -> the one in ``names``."""
    by_obj: dict[int, list[str]] = {}
    for n, p in fresh.named_parameters(remove_duplicate=False):
        by_obj.setdefault(id(p), []).append(n)
    out = {}
    for group in by_obj.values():
        owner = next((n for n in group if n in names), None)
        out.update({n: owner for n in group if owner is not None and n != owner})
    return out


def reference_module(model: "BiasModel"):
    """Plain Hugging Face code (no TransformerLens wrappers) running ``model``'s current weights:
    :meth:`~biaslens.model.BiasModel.plain_module` for a model loaded whole; for one placed by
    accelerate, a meta copy whose modules fetch each weight, one module at a time, through
    accelerate's offload hooks (``cpu_offload``) on the model's execution device. For inference
    (the weights it reads are copies)."""
    if not model.dispatched:
        return model.plain_module()
    from accelerate import cpu_offload

    fresh = meta_module(model)
    _real_buffers(model, fresh)
    fresh.tie_weights()
    live = _LiveWeights(model, tied_aliases(fresh, model.params))
    return cpu_offload(fresh, execution_device=model.device, state_dict=live).eval()


#: the context a word is tokenised after when no prompt is given (:meth:`BiasModel.word_ids`)
_NEUTRAL_CONTEXT = "The"


def logits_where(forward: Callable[..., "torch.Tensor"], keep: "torch.Tensor") -> "Float[torch.Tensor, 'n_keep vocab']":
    """Logits at the positions where the boolean ``keep`` ``[batch, pos]`` is True, in row-major
    order, from one call of ``forward(**kw)`` (a bridge or HF forward returning logits).

    Only those positions are unembedded where the model's forward takes ``logits_to_keep`` as a
    boolean mask (transformers' public argument): a full ``[batch, pos, vocab]`` tensor is mostly
    positions no metric reads, and at GPT-2's 50k vocab it costs more to allocate than the
    unembedding's matmul. A forward that takes no such argument, or returns every position
    anyway, is indexed instead."""
    n = int(keep.sum())
    try:
        logits = forward(logits_to_keep=keep)
    except TypeError:  # a model whose forward takes no logits_to_keep
        logits = None
    if logits is not None:
        if logits.ndim == 2 and logits.shape[0] == n:
            return logits
        if logits.ndim == 3 and tuple(logits.shape[:2]) == tuple(keep.shape):
            return logits[keep]
    return forward()[keep]


def last_position_mask(ids: "torch.Tensor", lengths: "torch.Tensor") -> "torch.Tensor":
    """``[batch, pos]`` booleans, True at each row's last real token."""
    import torch

    keep = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    keep[torch.arange(len(ids), device=ids.device), lengths.to(ids.device) - 1] = True
    return keep


class BiasModel:
    """A causal LM with hooks, token roles, target log-probabilities and weight snapshots.

    Attributes: ``bridge`` (TransformerBridge), ``hf`` (the Hugging Face model), ``tokenizer``,
    ``arch`` (:class:`~biaslens.arch.ArchSpec`), ``params`` (HF name → Parameter; the bridge reads
    these tensors, directly or through views, so in-place edits reach it — but train through
    :meth:`plain_module`), and the shape
    facts ``n_layers``, ``d_model``, ``d_mlp``, ``n_heads``, ``n_kv_heads``, ``d_head``.

    A model placed by accelerate (``load(..., device_map=...)``, docs/offload.md) keeps some
    weights outside their modules (meta tensors in ``params``; the values in the offload hook's
    weights map, in memory or on disk). Read and write weights through :meth:`param`,
    :meth:`snapshot`, :meth:`restore` and :meth:`mlp_out_matrix`, which reach the real values
    wherever they live; ``placement`` says how it was placed (None: loaded whole).
    """

    def __init__(self, spec, path, hf, bridge, tokenizer, arch: ArchSpec, params, prepend_bos=None,
                 buffers=None, slots=None, placement=None):
        self.spec, self.path, self.hf, self.bridge = spec, path, hf, bridge
        self.tokenizer, self.arch, self.params = tokenizer, arch, params
        self.buffers = buffers or {}
        self.placement = placement
        self._offload = _offload_table(slots or {})  # name -> (weights map, key)
        self._disk_views: dict[str, Any] = {}  # name -> writable view of its edited copy on disk
        self._exec_device = _execution_device(hf, bridge)
        if self._exec_device is not None and str(getattr(bridge.cfg, "device", "")) in ("", "meta", "None"):
            bridge.cfg.device = str(self._exec_device)  # the bridge saw the embedding on meta
        self._bridge_copies = _bridge_copies(hf, params) if self._exec_device is not None else set()
        if self._offload:  # meta stand-ins whose requires_grad_ reaches accelerate's placeholders
            self.params = params = {n: _linked_parameter(p, slots[n]) if n in self._offload else p
                                    for n, p in params.items()}
        cfg = bridge.cfg
        self.n_layers: int = cfg.n_layers
        self.d_model: int = cfg.d_model
        w = params[arch.name("mlp_out", 0)]  # the weight is the truth (cfg.d_mlp is wrong for OPT)
        self.d_mlp: int = int(w.shape[0] if arch.mlp_out_layout == "conv1d" else w.shape[1])
        self.n_heads: int = cfg.n_heads
        hc = hf.config
        self.n_kv_heads: int = getattr(hc, "num_key_value_heads", None) or cfg.n_heads
        self.d_head: int = cfg.d_head
        if prepend_bos is None:
            ids = tokenizer("a")["input_ids"]
            bos = tokenizer.bos_token_id
            prepend_bos = bos is not None and (not ids or ids[0] != bos)
        self.prepend_bos = bool(prepend_bos)

    # ------------------------------------------------------------------ facts
    @property
    def device(self):
        """Where inputs go: the device the model runs on (for a model placed by accelerate, its
        execution device; offloaded weights come there one module at a time)."""
        if self._exec_device is not None:
            return self._exec_device
        return next(iter(self.params.values())).device

    @property
    def offloaded(self) -> list[str]:
        """Names of the weights accelerate keeps off their module (in memory or on disk)."""
        return sorted(self._offload)

    @property
    def dispatched(self) -> bool:
        """Whether accelerate placed the model (a device map), rather than one ``device``."""
        return self._exec_device is not None

    @property
    def dtype(self):
        return next(iter(self.params.values())).dtype

    @property
    def name(self) -> str:
        return self.spec

    @property
    def n_params(self) -> int:
        seen, total = set(), 0
        for p in self.params.values():
            key = ("id", id(p)) if p.is_meta else p.data_ptr()  # offloaded: meta, no storage
            if key not in seen:
                seen.add(key)
                total += p.numel()
        return total

    def info(self) -> dict[str, Any]:
        a = self.arch
        return {
            "model": self.spec,
            "architecture": type(self.hf).__name__,
            "family": a.family,
            "layers": self.n_layers,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "heads": self.n_heads,
            "kv_heads": self.n_kv_heads,
            "d_head": self.d_head,
            "parameters": self.n_params,
            "vocab": len(self.tokenizer),
            "tokenizer": type(self.tokenizer).__name__,
            "prepend_bos": self.prepend_bos,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "mlp_out_weight": a.name("mlp_out", "{layer}") + f" ({a.mlp_out_layout} layout)",
            "mlp_key_hook": act_name("mlp_key", 0).replace(".0.", ".{layer}."),
            "mlp_in": [t + ".weight" for t in a.mlp_in],
            "attn_out_weight": a.name("attn_out", "{layer}"),
            "attn_qkv": [t + ".weight" for t in a.attn_qkv],
            "head_hook": act_name("z", 0).replace(".0.", ".{layer}.") + " [batch, pos, head, d_head]",
            "gated_mlp": a.gated_mlp,
            **({"placement": self.placement_info()} if self.dispatched else {}),
        }

    def placement_info(self) -> dict[str, Any]:
        """How accelerate placed the model: the arguments, modules per device, and how many
        weights are offloaded (``on_disk`` of them on disk)."""
        per: dict[str, int] = {}
        for d in (getattr(self.hf, "hf_device_map", None) or {}).values():
            per[str(d)] = per.get(str(d), 0) + 1
        disk = [n for n in self._offload if self._held(n) is None]
        return {**(self.placement.describe() if self.placement else {}),
                "execution_device": str(self.device), "modules_per_device": per,
                "offloaded_tensors": len(self._offload), "on_disk": len(disk)}

    def __repr__(self) -> str:
        return (f"BiasModel({self.spec!r}, {type(self.hf).__name__}, layers={self.n_layers}, "
                f"d_model={self.d_model}, heads={self.n_heads}, device={self.device})")

    # ------------------------------------------------------------- tokens
    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model can read (``n_positions`` / ``max_position_embeddings``;
        None when the config names no limit)."""
        cfg = self.hf.config
        n = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        return int(n) if n else None

    def tokenize(self, texts: Sequence[str], offsets: bool = False, length: str = "check"):
        """Token rows of ``texts`` as the model reads them: the tokenizer's special tokens, plus
        BOS first when the model prepends one. The one tokenisation path of biaslens.

        ``offsets=True`` also returns each token's character span (``(0, 0)`` for special
        tokens). ``length``: a row longer than :attr:`max_positions` raises
        :class:`BiasLensError` (``"check"``), keeps its first :attr:`max_positions` tokens
        (``"truncate"``), or is returned whole for the caller to window (``"any"``).
        """
        from biaslens.errors import BiasLensError

        if length not in ("check", "truncate", "any"):
            raise ValueError(f"length must be 'check', 'truncate' or 'any', not {length!r}")
        texts = list(texts)
        if not texts:
            return ([], []) if offsets else []
        enc = self.tokenizer(texts, add_special_tokens=True, return_offsets_mapping=offsets)
        bos = [self.tokenizer.bos_token_id] if self.prepend_bos else []
        rows = [bos + list(ids) for ids in enc["input_ids"]]
        offs = ([[(0, 0)] * len(bos) + [tuple(o) for o in om] for om in enc["offset_mapping"]]
                if offsets else None)
        limit = self.max_positions
        if limit is not None and length != "any":
            for i, r in enumerate(rows):
                if len(r) <= limit:
                    continue
                if length == "check":
                    raise BiasLensError(
                        f"text {i} is {len(r)} tokens, longer than the {limit} positions {self.spec} "
                        f"can read ({texts[i][:60]!r}...); shorten it or split it")
                rows[i] = r[:limit]
                if offs is not None:
                    offs[i] = offs[i][:limit]
        return (rows, offs) if offsets else rows

    def encode(self, prompts: Sequence[Any] | Any) -> TokenBatch:
        """Tokenise prompts, right-padded, with role positions from character offsets."""
        import torch

        if isinstance(prompts, (str, Prompt)) or hasattr(prompts, "text"):
            prompts = [prompts]
        ps = [as_prompt(p) for p in prompts]
        if not ps:
            raise ValueError("no prompts to encode")
        rows, offsets = self.tokenize([p.text for p in ps], offsets=True)
        roles: dict[str, list[list[int]]] = {}
        unk, unknown = self.tokenizer.unk_token_id, []  # special tokens have no characters
        for i, (p, ids, offs) in enumerate(zip(ps, rows, offsets)):
            if not ids:
                raise ValueError(f"prompt {i} tokenises to nothing: {p.text!r}")
            span = subject_span(p.text, p.subject)
            if span is not None and unk is not None and unk in ids and any(
                    t == unk and a < span[1] and b > span[0] for t, (a, b) in zip(ids, offs)):
                unknown.append(p.subject)
            r = roles_from_offsets(offs, span)
            for k, v in r.items():
                roles.setdefault(k, []).append(v)
        if unknown:
            raise VocabularyError(self._unknown_message(unknown, "prompt subjects"))
        lengths = torch.tensor([len(r) for r in rows])
        ids, mask = pad_rows(rows, self.tokenizer.pad_token_id, self.device)
        return TokenBatch(ids, mask, lengths.to(self.device), roles, ps)

    def continuation_ids(self, context: str, word: str) -> list[int]:
        """Token ids of ``word`` as the continuation of ``context``: the tokens of
        ``context + word`` after those of ``context``.

        This is how the model meets the word. SentencePiece/Metaspace tokenizers (LLaMA,
        Mistral, Qwen) write a lone word's leading space as a piece of its own (``" he"`` →
        ``["▁", "he"]``) but merge it after a context (``"that he"`` → ``["▁that", "▁he"]``);
        byte-level BPE gives the same ids both ways. When the word merges with the context's
        last token, the tokens from the first one that reaches into the word are used.
        Raises :class:`VocabularyError` when the word has no tokens or an unknown token.
        """
        key = (context, word)
        cache = self.__dict__.setdefault("_continuations", {})
        if key in cache:
            return list(cache[key])
        tok = self.tokenizer
        head = tok(context, add_special_tokens=False)["input_ids"] if context else []
        full = tok(context + word, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(full["input_ids"])
        if ids[: len(head)] == list(head):
            cont = ids[len(head):]
        else:  # the word merged into the context's last token: start at the first token reaching it
            cut = len(context)
            first = next((i for i, (a, b) in enumerate(full["offset_mapping"]) if b > cut), len(ids))
            cont = ids[first:]
        unk = tok.unk_token_id
        if not cont or (unk is not None and unk in cont and word.strip() != tok.unk_token):
            raise VocabularyError(
                f"the word {word!r} is not in the vocabulary of {self.spec}; "
                "check its spelling and leading space, or choose another word")
        cache[key] = tuple(cont)
        return cont

    def _unknown_message(self, words: Sequence[str], source: str) -> str:
        words = list(dict.fromkeys(words))
        shown = ", ".join(repr(w) for w in words[:5]) + (f" ... ({len(words)} in all)" if len(words) > 5 else "")
        return (f"{source}: {shown} cannot be represented by the tokenizer of {self.spec} (unknown "
                f"token {self.tokenizer.unk_token!r}); remove or respell {'them' if len(words) > 1 else 'it'} "
                "with characters the tokenizer knows")

    def check_words(self, words: Iterable[str], source: str = "words") -> None:
        """Refuse words the tokenizer cannot represent: no tokens, or an unknown token, when read
        with a leading space after a neutral context (as a prompt's subject or occupation is).
        ``source`` says where they came from (e.g. ``"occupations file occ.txt"``); raises
        :class:`VocabularyError` naming the words and the fix."""
        bad = []
        for w in dict.fromkeys(words):
            try:
                self.word_ids(w if w[:1].isspace() else " " + w)
            except VocabularyError:
                bad.append(w)
        if bad:
            raise VocabularyError(self._unknown_message(bad, source))

    def word_ids(self, word: str, context: str = "") -> list[int]:
        """Token ids of ``word`` (with its leading space, e.g. ``" she"``) as the continuation of
        ``context`` (see :meth:`continuation_ids`; without a context, of a neutral sentence)."""
        return self.continuation_ids(context or _NEUTRAL_CONTEXT, word)

    def single_token(self, word: str, context: str = "") -> int:
        """The one token id of ``word`` after ``context``; raises :class:`VocabularyError` if it
        is several tokens there."""
        ids = self.word_ids(word, context)
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            raise VocabularyError(
                f"{word!r} is {len(ids)} tokens for {self.spec} ({pieces}); this metric needs a "
                "one-token word: pick another word, or use a metric that sums a word's tokens "
                "(target_logprobs, female_share)"
            )
        return ids[0]

    # ------------------------------------------------------------ forward
    def forward(self, batch: TokenBatch | "torch.Tensor", fwd_hooks: Iterable = (),
                attention_mask=None) -> "Float[torch.Tensor, 'batch pos vocab']":
        """Logits for a batch, with optional ``(hook_name, fn)`` forward hooks."""
        if isinstance(batch, TokenBatch):
            ids, attention_mask = batch.input_ids, batch.attention_mask
        else:
            ids = batch
        hooks = list(fwd_hooks)
        if hooks:
            return self.bridge.run_with_hooks(ids, fwd_hooks=hooks, attention_mask=attention_mask)
        return self.bridge(ids, attention_mask=attention_mask)

    __call__ = forward

    def last_logits(self, batch: TokenBatch, fwd_hooks: Iterable = ()) -> "Float[torch.Tensor, 'batch vocab']":
        """Logits at each prompt's last real token (only those positions are unembedded)."""
        return self.logits_at(batch.input_ids, last_position_mask(batch.input_ids, batch.lengths),
                              fwd_hooks, batch.attention_mask)

    def logits_at(self, ids: "torch.Tensor", keep: "torch.Tensor", fwd_hooks: Iterable = (),
                  attention_mask=None) -> "Float[torch.Tensor, 'n_keep vocab']":
        """Logits where the boolean ``keep`` ``[batch, pos]`` is True (row-major), unembedding
        only those positions (:func:`logits_where`)."""
        hooks = list(fwd_hooks)

        def forward(**kw):
            if hooks:
                return self.bridge.run_with_hooks(ids, fwd_hooks=hooks, attention_mask=attention_mask, **kw)
            return self.bridge(ids, attention_mask=attention_mask, **kw)

        return logits_where(forward, keep)

    def run_with_cache(self, batch: TokenBatch, names: Iterable[str] | Callable | None = None, **kw):
        """``(logits, cache)`` from the bridge; ``names`` is a list of hook names or a filter."""
        if names is not None and not callable(names):
            wanted = set(names)
            names = wanted.__contains__
        return self.bridge.run_with_cache(
            batch.input_ids, attention_mask=batch.attention_mask, names_filter=names, **kw
        )

    def target_logprobs(
        self,
        batch: TokenBatch,
        targets: Sequence[str] | Sequence[Sequence[str]],
        fwd_hooks: Iterable = (),
        last_logits: "torch.Tensor | None" = None,
    ) -> "Float[torch.Tensor, 'batch n_targets']":
        """log P(target word | prompt) for each prompt, summed over a word's tokens.

        ``targets`` is one list of words for every prompt, or one list per prompt (same length).
        A word is tokenised as the continuation of its prompt (:meth:`continuation_ids`).
        One-token words are read off the prompt's last logits; multi-token words are scored by
        one extra batched teacher-forced forward pass.
        """
        import torch

        n = len(batch)
        per_prompt = [list(targets)] * n if targets and isinstance(targets[0], str) else [list(t) for t in targets]
        if len(per_prompt) != n:
            raise ValueError("targets must be one list of words, or one list per prompt")
        k = len(per_prompt[0])
        if any(len(t) != k for t in per_prompt):
            raise ValueError("every prompt needs the same number of target words")
        hooks = list(fwd_hooks)
        if last_logits is None:
            last_logits = self.last_logits(batch, hooks)
        lp_last = torch.log_softmax(last_logits.float(), dim=-1)
        out = torch.empty((n, k), dtype=torch.float32, device=lp_last.device)
        multi: list[tuple[int, int, list[int]]] = []
        for i, words in enumerate(per_prompt):
            for j, w in enumerate(words):
                ids = self.continuation_ids(batch.prompts[i].text, w)
                out[i, j] = lp_last[i, ids[0]]
                if len(ids) > 1:
                    multi.append((i, j, ids))
        if multi:
            if hooks:
                raise ValueError("multi-token targets with hooks are not supported; use one-token words")
            from biaslens.evaluate.scoring import score_rows

            # the first token was read off the last logits; score the rest teacher-forced
            rows = [batch.input_ids[i, : int(batch.lengths[i])].tolist() + ids for i, _, ids in multi]
            starts = [int(batch.lengths[i]) + 1 for i, _, _ in multi]
            extra = score_rows(self, rows, starts, progress=False).sums()
            for (i, j, _), e in zip(multi, extra):
                out[i, j] = out[i, j] + float(e)
        return out

    def sequence_logprobs(self, texts: Sequence[str], batch_size: int = 32,
                          reduce: str = "sum") -> "torch.Tensor":
        """Total (``"sum"``) or mean log-likelihood of each text under the model (every token
        given the ones before; :func:`biaslens.evaluate.scoring.score_rows`)."""
        import torch

        from biaslens.evaluate.scoring import score_rows

        s = score_rows(self, self.tokenize(texts), batch_size=batch_size, progress=False)
        vals = s.sums() if reduce == "sum" else [m if m == m else 0.0 for m in s.means()]
        return torch.tensor(vals, dtype=torch.float32, device=self.device)

    def plain_module(self, copy: bool = False) -> "torch.nn.Module":
        """A plain Hugging Face module (no TransformerBridge wrappers) running these weights.

        Take gradients through it, not through the bridge: the bridge runs GPT-2's fused
        ``c_attn`` through split q/k/v parameters that *view* the fused weight, so in-place updates
        of ``params`` reach the bridge but gradients through the bridge land on the views, not on
        ``params``. With ``copy=False`` the module holds the very Parameters of ``params`` (no extra
        memory; built once and reused); with ``copy=True`` clones (e.g. for FSDP, which
        re-allocates what it shards).
        """
        self.require_whole("training through a plain Hugging Face module (unlearning, fine-tuning)")
        if copy:
            return fresh_module(self, {n: p.detach().clone() for n, p in self.params.items()}).eval()
        if getattr(self, "_plain", None) is None:
            self._plain = fresh_module(self, dict(self.params)).eval()
        return self._plain

    # ------------------------------------------------------------ weights
    def hook_name(self, component: str, layer: int | None = None) -> str:
        return act_name(component, layer)

    def require_whole(self, what: str) -> None:
        """Refuse (:class:`BiasLensError`) ``what`` on a model accelerate placed with offloaded
        weights or split over devices: gradient training needs every weight in its module, on
        one device."""
        devices = {p.device for p in self.params.values() if not p.is_meta}
        if self._offload or len(devices) > 1:
            where = (f"{len(self._offload)} of its weights are offloaded" if self._offload
                     else f"it is split over {', '.join(sorted(map(str, devices)))}")
            raise BiasLensError(
                f"{what} needs the whole model on one device, but {self.spec} was loaded with a "
                f"device map ({where}); load it whole (no device_map / --device-map), e.g. on a "
                "GPU with enough memory, or use an edit (LSDM, ROME), which works on an offloaded "
                "model")

    def _held(self, name: str):
        """For an offloaded weight kept in memory by its hook (CPU offload): that tensor (the
        values accelerate copies to the execution device); None when it lives on disk."""
        ds, key = self._offload[name]
        held = getattr(ds, "state_dict", ds)
        if isinstance(held, dict) and key in held:
            return held[key]
        return None

    def param(self, name: str):
        """The weight ``name``: its Parameter (in-place updates reach the model); for an
        offloaded weight a tensor of its current values (the in-memory copy accelerate holds, or
        a fresh read from disk: write it with :meth:`restore`)."""
        if name not in self.params:
            raise KeyError(f"no parameter '{name}' in {self.spec}")
        off = self._offload.get(name)
        if off is None:
            return self.params[name]
        ds, key = off
        return ds[key]

    def _writable(self, name: str) -> "torch.Tensor":
        """A tensor whose in-place updates *are* the weight ``name`` as the forward pass reads it:
        the Parameter's data; the in-memory copy of a CPU-offloaded weight; for a disk-offloaded
        weight, a memory map of biaslens's own copy of it (made on first write in the placement's
        scratch folder, the offload index pointed at it; the model's own files are never
        written)."""
        if name not in self.params:
            raise KeyError(f"no parameter '{name}' in {self.spec}")
        if name in self._bridge_copies:
            raise BiasLensError(
                f"cannot edit {name} of {self.spec} as loaded: with this device map the "
                "TransformerLens bridge runs it through copies of its own, which an edit would not "
                "reach; load the model whole (no device_map) to edit it")
        off = self._offload.get(name)
        if off is None:
            return self.params[name].data
        held = self._held(name)
        if held is not None:
            return held
        view = self._disk_views.get(name)
        if view is None:
            view = self._disk_copy(name)
        return view

    def _disk_copy(self, name: str) -> "torch.Tensor":
        ds, key = self._offload[name]
        index = getattr(ds, "index", None)
        if not isinstance(index, dict) or key not in index:
            raise BiasLensError(f"cannot write the offloaded weight {name}: accelerate keeps it in "
                                f"a {type(ds).__name__}, which biaslens cannot write; load the model whole")
        if self.placement is None:
            raise BiasLensError(f"cannot write the offloaded weight {name}: the model was not "
                                "placed by biaslens.load")
        folder = self.placement.edits_folder()
        path = folder / f"{key}.safetensors"
        _save_aligned(path, key, ds[key])
        view = _safetensors_view(path, key)
        old = index[key]
        source = (old.get("safetensors_file"), old.get("weight_name", key))
        entry = {"safetensors_file": str(path), "weight_name": key,
                 "dtype": str(view.dtype).replace("torch.", "")}
        for k, v in list(index.items()):  # tied weights share the source: repoint them all
            if k == key or (source[0] is not None and
                            (v.get("safetensors_file"), v.get("weight_name", k)) == source):
                index[k] = entry
        self._disk_views[name] = view
        return view

    def mlp_out_weight(self, layer: int):
        """The MLP output projection's weight at ``layer`` (native layout; see :meth:`param`)."""
        return self.param(self.arch.name("mlp_out", layer))

    def mlp_out_name(self, layer: int) -> str:
        return self.arch.name("mlp_out", layer)

    def mlp_out_matrix(self, layer: int) -> "Float[torch.Tensor, 'd_model d_mlp']":
        """A ``[d_model, d_mlp]`` *view* of the MLP output weight (``out = W @ key``), whatever the
        native layout; in-place updates of the view update the model, offloaded or not (for a
        disk-offloaded weight the view is a memory map of biaslens's copy, on the CPU)."""
        w = self._writable(self.mlp_out_name(layer))
        return w.T if self.arch.mlp_out_layout == "conv1d" else w

    def snapshot(self, names: Iterable[str] | None = None) -> dict[str, "torch.Tensor"]:
        """Copies of the named parameters (all when ``names`` is None)."""
        names = list(self.params) if names is None else list(names)
        return {n: self.param(n).detach().clone() for n in names}

    def restore(self, snapshot: dict[str, "torch.Tensor"]) -> None:
        """Write the tensors of ``snapshot`` (name -> values) into the weights, bit for bit,
        wherever they live (see :meth:`mlp_out_matrix`)."""
        import torch

        with torch.no_grad():
            for n, t in snapshot.items():
                self._writable(n).copy_(t)

    def delta_since(self, snapshot: dict[str, "torch.Tensor"], **info):
        """A :class:`~biaslens.delta.WeightDelta` of what changed since ``snapshot``."""
        from biaslens.delta import WeightDelta

        return WeightDelta.from_snapshot(self, snapshot, **info)

    def check_finite(self, names: Iterable[str] | None = None) -> list[str]:
        """Names of parameters holding NaN or inf."""
        import torch

        names = list(self.params) if names is None else list(names)
        return [n for n in names if not torch.isfinite(self.param(n)).all()]

    def weight_hash(self, substitute: dict[str, "torch.Tensor"] | None = None) -> str:
        """SHA-256 over all parameters (name, dtype, shape, bytes), in name order.

        ``substitute`` replaces some tensors, e.g. a delta's originals to hash the base weights.
        """
        import torch

        substitute = substitute or {}
        h = hashlib.sha256()
        for n in sorted(self.params):
            t = (substitute[n] if n in substitute else self.param(n)).detach()
            h.update(n.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def require_single_model(model: Any, what: str) -> None:
    """Refuse a combination of models (an offset pair, :class:`biaslens.unlearn.offset.OffsetModel`)
    where ``what`` needs one model's weights, hooks or residual stream: tracing or editing it
    would silently act on one of its parts. Call before any work."""
    if getattr(type(model), "COMBINES_MODELS", False):
        raise BiasLensError(
            f"{what} needs one model's weights and activations, but {model.spec} combines the logits of "
            "several models; pass one of them (om.large, om.offset), or evaluate the combination instead")
