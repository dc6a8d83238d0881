"""Fast GPU decoding for Llama-family models without vLLM: one preallocated KV buffer shared by every call,
and one CUDA graph per decode step shape and attention span. The model's weights, rotary embedding and
activation do the maths in a decode step of our own with fewer, larger kernels (gaps between kernels were a
quarter of a 1B rollout's time, elementwise kernels another tenth: docs/h200_decode): the query, key and value
projections as one matmul, gate and up as one, an additive mask kept up to date instead of a boolean one
converted in every layer, and the elementwise work between matmuls (rotary on queries and keys, residual add +
RMSNorm, the gated activation) as one torch.compile'd kernel each (docs/h200_compile). Anything else uses the
dynamic-cache loop. On a CPU the same path runs eagerly, without graphs (tests hold it to the dynamic loop's
tokens)."""
from __future__ import annotations

from collections import OrderedDict

import torch

MAX_GRAPHS = 6  # shapes (rows, width, steps) kept captured at once; older ones are dropped
SPAN = 64  # a decode step attends over the buffer up to the next multiple of SPAN past its slot, not all of it


def supported(model) -> bool:
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    return (model.device.type == "cuda" and layers is not None and hasattr(decoder, "rotary_emb")
            and getattr(model.config, "model_type", "") in ("llama", "mistral", "qwen2")
            and all(_fusable(layer) for layer in layers))


def _fusable(layer) -> bool:
    """Projections `fuse_projections` can join: q/k/v, and gate/up, each with biases on all or none."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    try:
        groups = [[getattr(owner, n) for n in group] for owner, group in zip((attn, mlp), names)]
    except AttributeError:
        return False
    return (hasattr(mlp, "down_proj") and hasattr(mlp, "act_fn") and hasattr(attn, "o_proj")
            and all(len({m.bias is None for m in group}) == 1 for group in groups))


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
        self.fused = fuse_projections(model)
        from grpo.scoring import compiling

        # GRPO_COMPILE=0: eager elementwise kernels (torch.compile's are ~13% more tokens/s, docs/h200_compile)
        self.ops = _StepOps(model, compiled=self.graphs_on and compiling())

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
        steps = max_new_tokens
        for step in range(max_new_tokens):
            token, logp = draw(logits, temperature, generator)
            tokens[:, step] = token
            logps[:, step] = logp
            # which rows have stopped is worked out every 8 steps (one sync), not per step: fewer kernels
            if step % 8 == 7 and bool(torch.isin(tokens[:, :step + 1], stop).any(1).all()):
                steps = step + 1
                break
            if step + 1 < max_new_tokens:
                logits = shape.step(token, width + step)
        hit = torch.isin(tokens[:, :steps], stop)
        done = hit.any(1)  # the first stop token ends a row and is part of its completion
        lengths = torch.where(done, hit.int().argmax(1) + 1, max_new_tokens)
        return completions(tokens, logps, lengths, done)


class _Shape:
    """The cache views, inputs and captured graph of one (rows, width, steps) shape."""

    def __init__(self, owner: StaticDecoder, keys, values, rows: int, length: int):
        device = owner.model.device
        self.owner, self.keys, self.values, self.rows = owner, keys, values, rows
        # 0 where a slot attends, -inf where not (left padding, slots not written yet): SDPA's additive mask
        self.bias = torch.zeros((rows, length), device=device, dtype=owner.model.dtype)
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
        self.bias.fill_(float("-inf"))
        self.bias[:, :width].masked_fill_(mask.bool(), 0.0)
        self.position.copy_(next_position)
        self.slot.fill_(width)

    @torch.inference_mode()
    def _step(self, span: int) -> torch.Tensor:
        """One token per row at `slot`, attending over slots [0, span) (span > slot: later slots are empty)."""
        o, rows = self.owner, self.rows
        decoder = o.model.model
        heads, kv, dim = o.heads, o.kv_heads, o.head_dim
        ops = o.ops
        self.bias.index_fill_(1, self.slot, 0.0)
        hidden = decoder.embed_tokens(self.token)  # [rows, D]
        cos, sin = decoder.rotary_emb(hidden, self.position[:, None])  # [rows, 1, dim]
        mask = self.bias[:, None, None, :span]
        linear = torch.nn.functional.linear
        layers = decoder.layers
        normed = _norm(layers[0].input_layernorm, hidden)
        for layer, (block, (qkv_w, qkv_b, gate_up_w, gate_up_b)) in enumerate(zip(layers, o.fused)):
            attn, mlp = block.self_attn, block.mlp
            q, k, v = ops.rotate(linear(normed, qkv_w, qkv_b), cos, sin, heads, kv, dim)
            self.keys[layer].index_copy_(2, self.slot, k)
            self.values[layer].index_copy_(2, self.slot, v)
            out = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, None], self.keys[layer][:, :, :span], self.values[layer][:, :, :span], attn_mask=mask,
                enable_gqa=heads != kv)
            hidden, normed = ops.add_norm(hidden, attn.o_proj(out.reshape(rows, heads * dim)),
                                          block.post_attention_layernorm)
            up = ops.gated(linear(normed, gate_up_w, gate_up_b), mlp)
            after = layers[layer + 1].input_layernorm if layer + 1 < len(layers) else decoder.norm
            hidden, normed = ops.add_norm(hidden, mlp.down_proj(up), after)
        self.logits.copy_(o.model.lm_head(normed))
        self.position.add_(1)
        self.slot.add_(1)
        return self.logits

    def _warm_up(self, span: int) -> None:
        """One step outside the graph (lazy inits, and torch.compile's compilation); where compiling fails (no
        Triton or C compiler), the decoder goes on with eager kernels, said once."""
        owner = self.owner
        try:
            self._step(span)
        except Exception as error:
            if not owner.ops.compiled:
                raise
            import warnings

            warnings.warn(f"the sampler's decode step runs without torch.compile ({type(error).__name__}: "
                          f"{str(error)[:200]}); set GRPO_COMPILE=0 to skip the attempt", RuntimeWarning,
                          stacklevel=2)
            owner.ops = _StepOps(owner.model, compiled=False)
            self._step(span)

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
            state = (self.position.clone(), self.slot.clone(), self.bias.clone())
            with torch.cuda.stream(stream):
                self._warm_up(span)
            torch.cuda.current_stream().wait_stream(stream)
            self.position.copy_(state[0])
            self.slot.copy_(state[1])
            self.bias.copy_(state[2])
            if self.owner.pool is None:
                self.owner.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: in a group rank, engine and trainer share the process, and the trainer's checkpoint
            # thread pins host memory (cudaHostRegister) meanwhile; in the default (global) mode that call from
            # another thread invalidates this capture (seen on 2 x H200: ranks=2, the rollout after a checkpoint)
            with torch.cuda.graph(graph, pool=self.owner.pool, capture_error_mode="thread_local"):
                self._step(span)
            self.graphs[span] = graph
        self.graphs[span].replay()
        return self.logits


def fuse_projections(model) -> list[tuple]:
    """Per layer, the query/key/value projections as one [q + k + v, D] weight (and bias, as Qwen2 has) and
    gate/up as one [2 I, D]: (qkv weight, qkv bias, gate_up weight, gate_up bias). Each projection's parameters
    become views of their rows, so that new weights copied into them (hand-over, reload) land in the fused ones:
    one matmul each in a decode step, and no second copy of the weights."""
    fused = []
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        parts: list = []
        for linears in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
            for name in ("weight", "bias"):
                tensors = [getattr(m, name) for m in linears]
                if all(t is None for t in tensors):
                    parts.append(None)
                    continue
                whole, start = torch.cat([t.detach() for t in tensors]), 0
                for t in tensors:
                    t.data = whole[start:start + t.shape[0]]
                    start += t.shape[0]
                parts.append(whole)
        fused.append(tuple(parts))
    return fused


def _rotate(qkv, cos, sin, heads: int, kv: int, dim: int):
    """Queries [rows, heads, dim] and keys [rows, kv, 1, dim] rotated together, values [rows, kv, 1, dim]."""
    from transformers.models.llama.modeling_llama import rotate_half

    rows = qkv.shape[0]
    qk = qkv[:, :(heads + kv) * dim].view(rows, heads + kv, dim)
    qk = qk * cos + rotate_half(qk) * sin
    return qk[:, :heads], qk[:, heads:, None], qkv[:, (heads + kv) * dim:].view(rows, kv, 1, dim)


def _add_rms_norm(hidden, delta, weight, eps: float):
    hidden = hidden + delta
    return hidden, torch.nn.functional.rms_norm(hidden, weight.shape, weight, eps)


def _silu_gated(gate_up):
    gate, up = gate_up.chunk(2, -1)
    return torch.nn.functional.silu(gate) * up


class _StepOps:
    """The elementwise work between a decode step's matmuls: rotary, residual add + RMSNorm, the gated
    activation. Compiled on a GPU (each one fused kernel in place of several), eager elsewhere (same maths)."""

    def __init__(self, model, compiled: bool):
        from grpo.scoring import FUSABLE_NORMS

        self.silu = getattr(model.config, "hidden_act", "") == "silu"
        self.fusable = FUSABLE_NORMS
        self.compiled = compiled
        wrap = (lambda f: torch.compile(f, fullgraph=True)) if compiled else (lambda f: f)
        self.rotate, self._add_rms_norm, self._silu_gated = map(wrap, (_rotate, _add_rms_norm, _silu_gated))

    def add_norm(self, hidden, delta, module):
        """(hidden + delta, its norm under `module`)."""
        if type(module).__name__ in self.fusable:
            return self._add_rms_norm(hidden, delta, module.weight, module.variance_epsilon)
        hidden = hidden + delta
        return hidden, module(hidden)

    def gated(self, gate_up, mlp):
        if self.silu:
            return self._silu_gated(gate_up)
        gate, up = gate_up.chunk(2, -1)
        return mlp.act_fn(gate) * up


def _norm(module, hidden: torch.Tensor) -> torch.Tensor:
    """A Llama-style RMSNorm as torch's one fused kernel (the module's float32 casts are several); others as is."""
    from grpo.scoring import FUSABLE_NORMS, _fused_rms_norm

    return _fused_rms_norm(module, hidden) if type(module).__name__ in FUSABLE_NORMS else module(hidden)


def _cache_layers(cache):
    """(key, value) per layer of a transformers DynamicCache, across the 4.x and 5.x layouts."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))
