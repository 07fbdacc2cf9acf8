"""The one hooked-model abstraction every biaslens method uses.

:class:`BiasModel` wraps a TransformerLens 4.x ``TransformerBridge`` over a real Hugging Face
causal LM. The bridge's parameters *are* the HF module's parameters, so a weight edit made here is
an edit of the HF model, and hooks see raw HF numerics (no weight folding).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from biaslens.arch import ArchSpec, arch_for
from biaslens.errors import ModelLoadError, VocabularyError
from biaslens.hooks import act_name
from biaslens.prompts import (Prompt, TokenBatch, as_prompt, pad_rows, roles_from_offsets,
                              subject_span)

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}


def _torch_dtype(dtype: Any):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}' (use one of: {', '.join(DTYPES)})")
    return getattr(torch, DTYPES[dtype])


def resolve_spec(spec: str | os.PathLike) -> tuple[str, bool]:
    """Return ``(name_or_path, is_local)`` for a model spec, or raise a clear ModelLoadError."""
    spec = str(spec)
    if spec == "organism":
        from biaslens.organism import CHECKPOINT_DIR

        return str(CHECKPOINT_DIR), True
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
            f"model folder '{spec}' does not exist; pass an existing folder, a hub name, or 'organism'"
        )
    return spec, False


def load(
    spec: str | os.PathLike,
    device: str = "cpu",
    dtype: Any = "float32",
    prepend_bos: bool | None = None,
    allow_mismatch: bool = False,
) -> "BiasModel":
    """Load ``spec`` (``"organism"``, a hub name, or a local HF folder) as a :class:`BiasModel`.

    The weights must match the config: missing, unexpected or wrongly shaped tensors (which
    transformers would initialise at random or drop) raise :class:`ModelLoadError` naming them,
    unless ``allow_mismatch=True``. An unreadable weight file raises it naming the file.
    """
    name, is_local = resolve_spec(spec)
    torch_dtype = _torch_dtype(dtype)
    import logging
    import warnings

    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
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
            f"cannot load model '{spec}': {hint}; pass a local Hugging Face folder or 'organism' "
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
            hf, loading = AutoModelForCausalLM.from_pretrained(
                name, dtype=torch_dtype, attn_implementation="eager", output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below, by name
            )
        except _read_errors() as exc:  # evaluated only when something was raised
            raise ModelLoadError(_unreadable(spec, name, is_local, exc)) from None
        if not allow_mismatch:
            _check_loading(spec, hf, loading)
        hf.eval()
        params = dict(hf.named_parameters())
        buffers = dict(hf.named_buffers())  # HF names, recorded before the bridge wraps modules
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(
            name, hf_model=hf, tokenizer=tokenizer, device=device, dtype=torch_dtype
        )
    bridge.eval()
    return BiasModel(
        spec=str(spec), path=name if is_local else None, hf=hf, bridge=bridge,
        tokenizer=tokenizer, arch=arch, params=params, prepend_bos=prepend_bos, buffers=buffers,
    )


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
    for n, p in hf.named_parameters(remove_duplicate=False):
        by_ptr.setdefault(p.data_ptr(), []).append(n)
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


#: the context a word is tokenised after when no prompt is given (:meth:`BiasModel.word_ids`)
_NEUTRAL_CONTEXT = "The"


class BiasModel:
    """A causal LM with hooks, token roles, target log-probabilities and weight snapshots.

    Attributes: ``bridge`` (TransformerBridge), ``hf`` (the Hugging Face model), ``tokenizer``,
    ``arch`` (:class:`~biaslens.arch.ArchSpec`), ``params`` (HF name → Parameter; the bridge reads
    these tensors, directly or through views, so in-place edits reach it — but train through
    :meth:`plain_module`), and the shape
    facts ``n_layers``, ``d_model``, ``d_mlp``, ``n_heads``, ``n_kv_heads``, ``d_head``.
    """

    def __init__(self, spec, path, hf, bridge, tokenizer, arch: ArchSpec, params, prepend_bos=None,
                 buffers=None):
        self.spec, self.path, self.hf, self.bridge = spec, path, hf, bridge
        self.tokenizer, self.arch, self.params = tokenizer, arch, params
        self.buffers = buffers or {}
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
        return next(iter(self.params.values())).device

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
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
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
        }

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
        """Logits at each prompt's last real token."""
        import torch

        logits = self.forward(batch, fwd_hooks)
        return logits[torch.arange(len(batch), device=logits.device), batch.lengths - 1]

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
        from biaslens.export import _fresh_hf

        if copy:
            return _fresh_hf(self, {n: p.detach().clone() for n, p in self.params.items()}).eval()
        if getattr(self, "_plain", None) is None:
            self._plain = _fresh_hf(self, dict(self.params)).eval()
        return self._plain

    # ------------------------------------------------------------ weights
    def hook_name(self, component: str, layer: int | None = None) -> str:
        return act_name(component, layer)

    def param(self, name: str):
        try:
            return self.params[name]
        except KeyError:
            raise KeyError(f"no parameter '{name}' in {self.spec}") from None

    def mlp_out_weight(self, layer: int):
        """The MLP output projection's weight Parameter at ``layer`` (native layout)."""
        return self.param(self.arch.name("mlp_out", layer))

    def mlp_out_name(self, layer: int) -> str:
        return self.arch.name("mlp_out", layer)

    def mlp_out_matrix(self, layer: int) -> "Float[torch.Tensor, 'd_model d_mlp']":
        """A ``[d_model, d_mlp]`` *view* of the MLP output weight (``out = W @ key``), whatever the
        native layout; in-place updates of the view update the model."""
        w = self.mlp_out_weight(layer)
        return w.data.T if self.arch.mlp_out_layout == "conv1d" else w.data

    def snapshot(self, names: Iterable[str] | None = None) -> dict[str, "torch.Tensor"]:
        """Copies of the named parameters (all when ``names`` is None)."""
        names = list(self.params) if names is None else list(names)
        return {n: self.param(n).detach().clone() for n in names}

    def restore(self, snapshot: dict[str, "torch.Tensor"]) -> None:
        import torch

        with torch.no_grad():
            for n, t in snapshot.items():
                self.param(n).copy_(t)

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
            t = substitute.get(n, self.params[n]).detach()
            h.update(n.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
