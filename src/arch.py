"""Where the pieces of each architecture live: the one place per-architecture facts are kept.

Hugging Face parameter names are templates with ``{layer}``. The MLP *key* (the input to the MLP
output projection, i.e. the post-activation hidden vector; for gated MLPs ``act(gate) * up``) is
read from the TransformerBridge hook ``blocks.{layer}.mlp.hook_post`` for every architecture.

Layouts of the MLP output weight:
- ``"conv1d"`` (GPT-2 ``Conv1D``): ``weight`` is ``[d_mlp, d_model]`` and ``out = key @ weight``.
- ``"linear"`` (``nn.Linear``): ``weight`` is ``[d_model, d_mlp]`` and ``out = weight @ key``.
:meth:`biaslens.model.BiasModel.mlp_out_matrix` hides the difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ArchSpec", "ARCHITECTURES", "arch_for"]


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    mlp_out: str
    mlp_out_layout: str
    mlp_in: tuple[str, ...]
    attn_out: str
    attn_qkv: tuple[str, ...]
    embed: str
    unembed: str
    final_norm: str
    gated_mlp: bool = False
    pos_embed: str | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)
    #: the transformer block of a layer (every parameter of the block starts with it + ".")
    block: str = ""
    #: layout of the 2-D projection weights inside the blocks: "linear" ([out, in], nn.Linear) or
    #: "conv1d" ([in, out], GPT-2 Conv1D). Embedding and unembedding matrices are [n_tokens, d].
    proj_layout: str = "linear"

    def name(self, piece: str, layer: int | None = None, suffix: str = "weight") -> str:
        """Hugging Face parameter name of ``piece`` (an attribute holding a template)."""
        template = getattr(self, piece)
        if isinstance(template, tuple):
            raise ValueError(f"{piece} has several parameters; use names()")
        base = template.format(layer=layer) if layer is not None else template
        return f"{base}.{suffix}" if suffix else base

    def names(self, piece: str, layer: int, suffix: str = "weight") -> list[str]:
        templates = getattr(self, piece)
        templates = templates if isinstance(templates, tuple) else (templates,)
        return [f"{t.format(layer=layer)}.{suffix}" for t in templates]

    def output_dim(self, param_name: str, ndim: int = 2) -> int:
        """The dimension of a 2-D weight that indexes *output units*, so that "row ``i``" means
        output unit ``i``'s input weights in every architecture: 0 for ``nn.Linear`` ``[out, in]``
        and for embedding/unembedding ``[n_tokens, d]`` (row = one token's vector), 1 for GPT-2
        ``Conv1D`` ``[in, out]``."""
        if ndim != 2:
            raise ValueError(f"{param_name} is {ndim}-D; output_dim is defined for 2-D weights")
        tables = tuple(t for t in (self.embed, self.pos_embed, self.unembed) if t)
        if param_name.startswith(tables) or self.proj_layout == "linear":
            return 0
        return 1

    def component_modules(self, component: str, layer: int) -> list[str]:
        """Module-name prefixes of a traced component at ``layer``: ``"mlp"`` (MLP in and out
        projections), ``"attn"`` (q/k/v and output projections) or ``"resid"`` (the whole block)."""
        if component == "mlp":
            return [t.format(layer=layer) for t in (*self.mlp_in, self.mlp_out)]
        if component == "attn":
            return [t.format(layer=layer) for t in (*self.attn_qkv, self.attn_out)]
        if component == "resid":
            return [self.block.format(layer=layer)]
        raise ValueError(f"unknown component '{component}' (use mlp, attn or resid)")


ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(
        family="gpt2",
        block="transformer.h.{layer}",
        proj_layout="conv1d",
        model_types=("gpt2",),
        mlp_out="transformer.h.{layer}.mlp.c_proj",
        mlp_out_layout="conv1d",
        mlp_in=("transformer.h.{layer}.mlp.c_fc",),
        attn_out="transformer.h.{layer}.attn.c_proj",
        attn_qkv=("transformer.h.{layer}.attn.c_attn",),
        embed="transformer.wte",
        pos_embed="transformer.wpe",
        unembed="lm_head",
        final_norm="transformer.ln_f",
        notes="Conv1D layers store the transpose of nn.Linear; q, k, v are fused in c_attn.",
    ),
    ArchSpec(
        family="gpt_neox",
        block="gpt_neox.layers.{layer}",
        model_types=("gpt_neox",),
        mlp_out="gpt_neox.layers.{layer}.mlp.dense_4h_to_h",
        mlp_out_layout="linear",
        mlp_in=("gpt_neox.layers.{layer}.mlp.dense_h_to_4h",),
        attn_out="gpt_neox.layers.{layer}.attention.dense",
        attn_qkv=("gpt_neox.layers.{layer}.attention.query_key_value",),
        embed="gpt_neox.embed_in",
        unembed="embed_out",
        final_norm="gpt_neox.final_layer_norm",
        notes="Parallel attention and MLP by default (use_parallel_residual); rotary positions.",
    ),
    ArchSpec(
        family="opt",
        block="model.decoder.layers.{layer}",
        model_types=("opt",),
        mlp_out="model.decoder.layers.{layer}.fc2",
        mlp_out_layout="linear",
        mlp_in=("model.decoder.layers.{layer}.fc1",),
        attn_out="model.decoder.layers.{layer}.self_attn.out_proj",
        attn_qkv=(
            "model.decoder.layers.{layer}.self_attn.q_proj",
            "model.decoder.layers.{layer}.self_attn.k_proj",
            "model.decoder.layers.{layer}.self_attn.v_proj",
        ),
        embed="model.decoder.embed_tokens",
        pos_embed="model.decoder.embed_positions",
        unembed="lm_head",
        final_norm="model.decoder.final_layer_norm",
        notes="Learned positions offset by 2; the tokenizer prepends </s> as BOS.",
    ),
    ArchSpec(
        family="llama",
        block="model.layers.{layer}",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        mlp_out="model.layers.{layer}.mlp.down_proj",
        mlp_out_layout="linear",
        mlp_in=("model.layers.{layer}.mlp.gate_proj", "model.layers.{layer}.mlp.up_proj"),
        attn_out="model.layers.{layer}.self_attn.o_proj",
        attn_qkv=(
            "model.layers.{layer}.self_attn.q_proj",
            "model.layers.{layer}.self_attn.k_proj",
            "model.layers.{layer}.self_attn.v_proj",
        ),
        embed="model.embed_tokens",
        unembed="lm_head",
        final_norm="model.norm",
        gated_mlp=True,
        notes="Gated MLP: the key is act(gate_proj x) * up_proj x, the input to down_proj. "
        "Grouped-query attention: k_proj/v_proj have n_key_value_heads heads.",
    ),
)


def arch_for(model_type: str) -> ArchSpec:
    """The :class:`ArchSpec` for a Hugging Face ``config.model_type``."""
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    supported = ", ".join(t for s in ARCHITECTURES for t in s.model_types)
    from biaslens.errors import ModelLoadError

    raise ModelLoadError(
        f"architecture '{model_type}' is not supported yet (supported: {supported}); "
        "add an ArchSpec for it in biaslens/arch.py"
    )
