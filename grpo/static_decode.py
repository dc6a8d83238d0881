"""Fast GPU decoding for Llama-family models without vLLM: a preallocated KV cache and one CUDA graph per
decode step. The model's own modules (norms, projections, rotary embedding, MLP, head) do the maths; only
attention over the static cache is ours. Anything else falls back to HFSampler's dynamic-cache loop."""
from __future__ import annotations

import torch


def supported(model) -> bool:
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    return (model.device.type == "cuda" and layers is not None and hasattr(decoder, "rotary_emb")
            and all(hasattr(layer, "self_attn") and hasattr(layer.self_attn, "q_proj") for layer in layers)
            and getattr(model.config, "model_type", "") in ("llama", "mistral", "qwen2"))


class StaticDecoder:
    """Decode `rows` sequences in lock-step for up to `steps` tokens after a shared-width prefill."""

    def __init__(self, model, rows: int, width: int, steps: int):
        cfg = model.config
        self.model, self.rows, self.width, self.steps = model, rows, width, steps
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        length = width + steps
        shape = (rows, self.kv_heads, length, self.head_dim)
        device, dtype = model.device, model.dtype
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in model.model.layers]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in model.model.layers]
        self.valid = torch.zeros((rows, length), device=device, dtype=torch.bool)  # which slots attend
        self.token = torch.zeros((rows,), device=device, dtype=torch.long)
        self.position = torch.zeros((rows,), device=device, dtype=torch.long)
        self.slot = torch.zeros((1,), device=device, dtype=torch.long)
        self.logits = None
        self.graph = None

    def prefill(self, cache, mask: torch.Tensor, next_position: torch.Tensor) -> None:
        """Copy a prefilled HF cache ([rows, kv_heads, width, dim] per layer) and its padding mask in."""
        for layer, (k, v) in enumerate(_cache_layers(cache)):
            self.keys[layer][:, :, :self.width].copy_(k)
            self.values[layer][:, :, :self.width].copy_(v)
        self.valid.zero_()
        self.valid[:, :self.width] = mask.bool()
        self.position.copy_(next_position)
        self.slot.fill_(self.width)

    @torch.inference_mode()
    def _step(self) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        decoder = self.model.model
        self.valid.index_fill_(1, self.slot, True)
        hidden = decoder.embed_tokens(self.token[:, None])
        cos, sin = decoder.rotary_emb(hidden, self.position[:, None])
        mask = self.valid[:, None, None, :]
        for layer, block in enumerate(decoder.layers):
            attn = block.self_attn
            x = block.input_layernorm(hidden)
            q = attn.q_proj(x).view(self.rows, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(self.rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(self.rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.keys[layer].index_copy_(2, self.slot, k)
            self.values[layer].index_copy_(2, self.slot, v)
            out = torch.nn.functional.scaled_dot_product_attention(
                q, self.keys[layer], self.values[layer], attn_mask=mask, enable_gqa=self.heads != self.kv_heads)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(self.rows, 1, -1))
            hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        logits = self.model.lm_head(decoder.norm(hidden))[:, 0].float()
        self.position.add_(1)
        self.slot.add_(1)
        return logits

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; return next-token logits [rows, vocab] (float32)."""
        self.token.copy_(token)
        if self.graph is None:  # capture once per decoder: shapes never change
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            state = (self.position.clone(), self.slot.clone(), self.valid.clone())
            with torch.cuda.stream(stream):
                self._step()  # warm-up outside the graph (lazy inits)
            torch.cuda.current_stream().wait_stream(stream)
            self.position.copy_(state[0])
            self.slot.copy_(state[1])
            self.valid.copy_(state[2])
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()
        self.graph.replay()
        return self.logits


def _cache_layers(cache):
    """(key, value) per layer of a transformers DynamicCache, across the 4.x and 5.x layouts."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))
