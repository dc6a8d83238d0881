"""Fast GPU decoding for Llama-family models without vLLM: one preallocated KV buffer shared by every call,
and one CUDA graph per decode step shape and attention span. The model's own modules (norms, projections, rotary
embedding, MLP, head) do the maths; only attention over the static cache is ours. Anything else uses the
dynamic-cache loop. On a CPU the same path runs without graphs (tests hold it to the dynamic loop's tokens)."""
from __future__ import annotations

from collections import OrderedDict

import torch

MAX_GRAPHS = 6  # shapes (rows, width, steps) kept captured at once; older ones are dropped
SPAN = 128  # a decode step attends over the buffer up to the next multiple of SPAN past its slot, not all of it


def supported(model) -> bool:
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    return (model.device.type == "cuda" and layers is not None and hasattr(decoder, "rotary_emb")
            and all(hasattr(layer, "self_attn") and hasattr(layer.self_attn, "q_proj") for layer in layers)
            and getattr(model.config, "model_type", "") in ("llama", "mistral", "qwen2"))


class StaticDecoder:
    """Lock-step decoding of up to `max_rows` sequences. The KV buffer is reserved before a call's first prefill
    at the size its widest chunk needs (`reserve`), and every shape's cache is a contiguous view of it, so
    evaluation and rollouts never hold two caches and the buffer never grows while a prefill's cache is alive."""

    def __init__(self, model, max_rows: int):
        cfg = model.config
        self.model, self.max_rows = model, max_rows
        self.graphs_on = model.device.type == "cuda"
        self.allocations = 0  # buffers allocated so far (benchmarks and tests read it)
        self.pool = None  # one CUDA graph memory pool for every graph: they replay one at a time
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = len(model.model.layers)
        self.buffer: torch.Tensor | None = None  # [2 * layers, elements]
        self.graphs: OrderedDict = OrderedDict()

    def release(self) -> None:
        self.graphs.clear()
        self.buffer, self.pool = None, None
        torch.cuda.empty_cache()

    def reserve(self, rows: int, length: int) -> None:
        """Make the buffer hold `rows` sequences of `length` tokens (prompt width + new tokens); a larger one is
        allocated only here, after dropping the old one and its graphs, never beside it."""
        need = rows * self.kv_heads * length * self.head_dim
        if self.buffer is None or self.buffer.shape[1] < need:
            self.release()
            self.buffer = torch.zeros((2 * self.layers, need), device=self.model.device, dtype=self.model.dtype)
            self.allocations += 1

    def _shape(self, rows: int, length: int):
        need = rows * self.kv_heads * length * self.head_dim
        self.reserve(rows, length)  # a no-op when the call reserved first, as TorchEngine does
        view = lambda k: self.buffer[k, :need].view(rows, self.kv_heads, length, self.head_dim)  # noqa: E731
        return [view(k) for k in range(self.layers)], [view(self.layers + k) for k in range(self.layers)]

    def _graph(self, rows: int, width: int, steps: int) -> "_Shape":
        key = (rows, width, steps)
        if key not in self.graphs:  # (a larger buffer drops every captured graph: their pointers go stale)
            keys, values = self._shape(rows, width + steps)
            self.graphs[key] = _Shape(self, keys, values, rows, width + steps)
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        return self.graphs[key]

    def decode(self, cache, n, logits, mask, next_pos, width, temperature, max_new_tokens, generator, stop, pad):
        """`cache` holds each prompt once; `logits`, `mask` and `next_pos` are already repeated `n` times."""
        from grpo.engines.base import completions, draw

        rows = len(logits)
        shape = self._graph(rows, width, max_new_tokens)
        shape.prefill(cache, n, mask, next_pos, width)
        del cache
        tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=logits.device)
        logps = torch.zeros((rows, max_new_tokens), device=logits.device)
        lengths = torch.full((rows,), max_new_tokens, device=logits.device)
        done = torch.zeros(rows, dtype=torch.bool, device=logits.device)
        for step in range(max_new_tokens):
            token, logp = draw(logits, temperature, generator)
            tokens[:, step] = token
            logps[:, step] = logp
            finished = torch.isin(token, stop) & ~done
            lengths = torch.where(finished, step + 1, lengths)
            done |= finished
            if step + 1 == max_new_tokens or (step % 8 == 7 and bool(done.all())):  # sync rarely
                break
            logits = shape.step(token, width + step)
        return completions(tokens, logps, lengths, done)


class _Shape:
    """The cache views, inputs and captured graph of one (rows, width, steps) shape."""

    def __init__(self, owner: StaticDecoder, keys, values, rows: int, length: int):
        device = owner.model.device
        self.owner, self.keys, self.values, self.rows = owner, keys, values, rows
        self.valid = torch.zeros((rows, length), device=device, dtype=torch.bool)  # which slots attend
        self.token = torch.zeros((rows,), device=device, dtype=torch.long)
        self.position = torch.zeros((rows,), device=device, dtype=torch.long)
        self.slot = torch.zeros((1,), device=device, dtype=torch.long)
        self.length = length
        # every span's graph writes its logits here, so that one [rows, vocab] output is kept per shape, not per span
        self.logits = torch.empty((rows, owner.model.lm_head.weight.shape[0]), device=device, dtype=torch.float32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # attended length -> captured graph

    def prefill(self, cache, n: int, mask: torch.Tensor, next_position: torch.Tensor, width: int) -> None:
        """Copy a prefilled HF cache ([prompts, kv_heads, width, dim] per layer) into the rows, each prompt into
        its `n` consecutive rows by broadcasting (no repeated copy of the cache exists), and the padding mask."""
        for layer, (k, v) in enumerate(_cache_layers(cache)):
            for buffer, source in ((self.keys[layer], k), (self.values[layer], v)):
                rows, heads, length, dim = buffer.shape
                buffer.view(rows // n, n, heads, length, dim)[:, :, :, :width].copy_(source[:, None])
        self.valid.zero_()
        self.valid[:, :width] = mask.bool()
        self.position.copy_(next_position)
        self.slot.fill_(width)

    @torch.inference_mode()
    def _step(self, span: int) -> torch.Tensor:
        """One token per row at `slot`, attending over slots [0, span) (span > slot: later slots are empty)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        o = self.owner
        decoder = o.model.model
        self.valid.index_fill_(1, self.slot, True)
        hidden = decoder.embed_tokens(self.token[:, None])
        cos, sin = decoder.rotary_emb(hidden, self.position[:, None])
        mask = self.valid[:, None, None, :span]
        for layer, block in enumerate(decoder.layers):
            attn = block.self_attn
            x = block.input_layernorm(hidden)
            q = attn.q_proj(x).view(self.rows, 1, o.heads, o.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(self.rows, 1, o.kv_heads, o.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(self.rows, 1, o.kv_heads, o.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.keys[layer].index_copy_(2, self.slot, k)
            self.values[layer].index_copy_(2, self.slot, v)
            out = torch.nn.functional.scaled_dot_product_attention(
                q, self.keys[layer][:, :, :span], self.values[layer][:, :, :span], attn_mask=mask,
                enable_gqa=o.heads != o.kv_heads)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(self.rows, 1, -1))
            hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        self.logits.copy_(o.model.lm_head(decoder.norm(hidden))[:, 0])
        self.position.add_(1)
        self.slot.add_(1)
        return self.logits

    def step(self, token: torch.Tensor, slot: int) -> torch.Tensor:
        """Feed one token per row, written at `slot` (the host's count of the device-side slot); return the
        next-token logits [rows, vocab] (float32). Attention reads the buffer up to the next multiple of SPAN past
        the slot: one graph per span, so early steps do not read the empty rest of the buffer."""
        self.token.copy_(token)
        span = min(self.length, (slot // SPAN + 1) * SPAN)
        if not self.owner.graphs_on:
            return self._step(span)
        if span not in self.graphs:  # capture once per (shape, span)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            state = (self.position.clone(), self.slot.clone(), self.valid.clone())
            with torch.cuda.stream(stream):
                self._step(span)  # warm-up outside the graph (lazy inits)
            torch.cuda.current_stream().wait_stream(stream)
            self.position.copy_(state[0])
            self.slot.copy_(state[1])
            self.valid.copy_(state[2])
            if self.owner.pool is None:
                self.owner.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.owner.pool):
                self._step(span)
            self.graphs[span] = graph
        self.graphs[span].replay()
        return self.logits


def _cache_layers(cache):
    """(key, value) per layer of a transformers DynamicCache, across the 4.x and 5.x layouts."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))
