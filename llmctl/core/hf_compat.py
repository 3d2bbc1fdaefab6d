"""Name and layout mapping between llmctl's `Transformer` and Hugging Face's `LlamaForCausalLM`.

Checkpoint weights in, HF-named weights out (for `export-hf`), and the inverse (for a later
`import-hf`). The two models compute the same function (see `core/model.py`); only the layout of two
fused projections differs:

    layers.{i}.attn.wqkv.weight  rows [q (n_heads*hd); k (n_kv*hd); v (n_kv*hd)]
                                 <-> self_attn.q_proj / k_proj / v_proj
    layers.{i}.mlp.w13.weight    rows [gate (d_ff); up (d_ff)] <-> mlp.gate_proj / up_proj

Everything else is a rename. Transformers is not imported here: `to_hf_config` returns plain
keyword arguments for `transformers.LlamaConfig`, so this module works without transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmctl.core.errors import InputError
from llmctl.core.model import ModelConfig

# One-to-one renames inside a block: llmctl suffix -> HF suffix (under model.layers.{i}.).
_BLOCK_RENAMES = {
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for `transformers.LlamaConfig` describing the same architecture.

    Args:
        cfg: The llmctl model config.

    Returns:
        A JSON-ready dict; `LlamaConfig(**to_hf_config(cfg))` builds the matching HF config.
    """
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers >= 5 reads the RoPE base from `rope_parameters`; 4.x reads `rope_theta`
        # (5.x accepts and folds in the flat key too), so both are given with the same value.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
    }


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF `LlamaForCausalLM` state dict from an llmctl `Transformer`.

    Args:
        model: The llmctl model (unwrapped).

    Returns:
        Tensors by HF name. Fused projections are split into views, so call `.clone()` or
        `.contiguous()` before saving if the file format needs owning tensors. With tied embeddings
        `lm_head.weight` is left out, as HF saves it.
    """
    cfg: ModelConfig = model.cfg
    sd = model.state_dict()
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "attn.wqkv.weight"].split([q_rows, kv_rows, kv_rows], dim=0)
        out[dst + "self_attn.q_proj.weight"] = q
        out[dst + "self_attn.k_proj.weight"] = k
        out[dst + "self_attn.v_proj.weight"] = v
        gate, up = sd[src + "mlp.w13.weight"].split(cfg.d_ff, dim=0)
        out[dst + "mlp.gate_proj.weight"] = gate
        out[dst + "mlp.up_proj.weight"] = up
        for ours, theirs in _BLOCK_RENAMES.items():
            out[dst + theirs] = sd[src + ours]
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """llmctl `Transformer` state dict from HF `LlamaForCausalLM` tensors (inverse of
    `to_hf_state_dict`).

    Args:
        sd: Tensors by HF name (`model.safetensors` of a Llama checkpoint).
        cfg: The llmctl config the weights are for (e.g. built from the HF config.json).

    Returns:
        Tensors by llmctl name, ready for `Transformer(cfg).load_state_dict(..., strict=True)`.
        With tied embeddings `lm_head.weight` is the embedding tensor itself.

    Raises:
        InputError: A tensor the config needs is missing from `sd`.
    """

    def get(name: str) -> torch.Tensor:
        if name not in sd:
            raise InputError(
                f"Hugging Face state dict has no tensor '{name}'",
                "check that the weights are a LlamaForCausalLM matching its config.json",
            )
        return sd[name]

    out = {
        "embed.weight": get("model.embed_tokens.weight"),
        "norm.weight": get("model.norm.weight"),
    }
    # A tied HF checkpoint usually omits lm_head.weight; an untied one must have it.
    out["lm_head.weight"] = out["embed.weight"] if cfg.tie_embeddings else get("lm_head.weight")
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out[dst + "attn.wqkv.weight"] = torch.cat(
            [get(src + f"self_attn.{p}_proj.weight") for p in ("q", "k", "v")], dim=0
        )
        out[dst + "mlp.w13.weight"] = torch.cat(
            [get(src + "mlp.gate_proj.weight"), get(src + "mlp.up_proj.weight")], dim=0
        )
        for ours, theirs in _BLOCK_RENAMES.items():
            out[dst + ours] = get(src + theirs)
    return out
