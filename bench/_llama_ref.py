"""The PyTorch reference of synehr.model.Decoder: transformers' LlamaForCausalLM with the same config and our weights.

Used by the benchmarks only (torch and transformers live in the benchmark's environment, never in the kit's).
"""
from __future__ import annotations

import numpy as np


def llama_config(cfg):
    "A transformers LlamaConfig equal to a synehr ModelConfig (no knowledge fusion, no dropout)."
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=cfg.V, hidden_size=cfg.D, intermediate_size=cfg.F, num_hidden_layers=cfg.L,
                       num_attention_heads=cfg.H, num_key_value_heads=cfg.K, head_dim=cfg.Dh, max_position_embeddings=cfg.T,
                       rope_theta=cfg.rope_theta, rms_norm_eps=cfg.eps, tie_word_embeddings=cfg.tie_embeddings,
                       attention_bias=False, mlp_bias=False, hidden_act="silu", attention_dropout=0.0,
                       initializer_range=cfg.init_std, bos_token_id=None, eos_token_id=None, pad_token_id=0)


def torch_llama(model, threads: int | None = None):
    "LlamaForCausalLM (eval mode, float32) carrying the weights of a synehr Decoder."
    import jax
    import torch
    from flax import nnx
    from transformers import LlamaForCausalLM
    cfg = model.cfg
    if cfg.use_hierarchy or cfg.use_semantic: raise ValueError("the reference has no knowledge fusion: build the model without it")
    if threads: torch.set_num_threads(threads)
    ref = LlamaForCausalLM(llama_config(cfg)).eval()
    p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    t = lambda x: torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy
    sd = {"model.embed_tokens.weight": t(p["embed"]["embedding"]), "model.norm.weight": t(p["norm"]["scale"])}
    L = p["layers"]
    for i in range(cfg.L):
        pre = f"model.layers.{i}."
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
            sd[pre + f"self_attn.{theirs}.weight"] = t(L["attn"][ours]["kernel"][i].T)
        for ours in ("gate", "up", "down"):
            sd[pre + f"mlp.{ours}_proj.weight"] = t(L["mlp"][ours]["kernel"][i].T)
        sd[pre + "input_layernorm.weight"] = t(L["attn_norm"]["scale"][i])
        sd[pre + "post_attention_layernorm.weight"] = t(L["mlp_norm"]["scale"][i])
    if cfg.tie_embeddings: sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    else: sd["lm_head.weight"] = t(p["head"]["kernel"].T)
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise RuntimeError(f"weight copy mismatch: missing {missing}, unexpected {unexpected}")
    return ref
