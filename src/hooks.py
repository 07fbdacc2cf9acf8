"""Hook names are data: every hook name biaslens uses is built here (TransformerBridge names)."""

from __future__ import annotations

__all__ = ["ALIASES", "canonical", "act_name"]

_COMPONENT_HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "mlp_key": "blocks.{layer}.mlp.hook_post",  # input to the MLP output projection
    "mlp_pre": "blocks.{layer}.mlp.hook_pre",
    "z": "blocks.{layer}.attn.hook_z",  # [batch, pos, head, d_head]
    "pattern": "blocks.{layer}.attn.hook_pattern",
    "embed": "hook_embed",
}

# Short names accepted wherever a component is named.
ALIASES = {"resid": "resid_pre", "mlp": "mlp_out", "attn": "attn_out", "key": "mlp_key"}


def canonical(component: str) -> str:
    component = ALIASES.get(component, component)
    if component not in _COMPONENT_HOOKS:
        known = ", ".join(sorted(set(_COMPONENT_HOOKS) | set(ALIASES)))
        raise ValueError(f"unknown component '{component}' (known: {known})")
    return component


def act_name(component: str, layer: int | None = None) -> str:
    """Hook name of ``component`` at ``layer``, e.g. ``act_name("mlp", 3) == "blocks.3.hook_mlp_out"``."""
    template = _COMPONENT_HOOKS[canonical(component)]
    if "{layer}" in template:
        if layer is None:
            raise ValueError(f"component '{component}' needs a layer")
        return template.format(layer=layer)
    return template
