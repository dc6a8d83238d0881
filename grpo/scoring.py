"""Per-token logprobs of (prompt, completion) pairs under a model: the trainer's and the reference's view of a
rollout. Rows are packed into one sequence without padding, attention stays within each row, and the
vocabulary projection runs on completion positions only, in chunks, so a [tokens, vocab] tensor never exists
for the whole batch (its gradient is recomputed chunk by chunk in the backward pass)."""
from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import types
from dataclasses import dataclass

import torch

VARLEN = "grpo_varlen"  # our attention implementation: flash-attention over packed rows (CUDA)
CHUNK_ELEMENTS = 2**27  # logits per chunk: 128M floats (0.5 GB) whatever the vocabulary size
# RMSNorms computed as weight * (x normalised in float32, rounded to x's dtype), eps in `variance_epsilon`
FUSABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


@dataclass
class Packed:
    """Rows packed back to back. ids/positions [1, L]; cu_seqlens [B+1] int32 row starts; where [N] index
    (into L) of the position that predicts each completion token; targets [N] those tokens; seq [N] their row;
    seq_tokens [B] completion tokens per row."""
    ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    where: torch.Tensor
    targets: torch.Tensor
    seq: torch.Tensor
    seq_tokens: torch.Tensor


def pack(prompts: list[list[int]], completions: list[list[int]], device) -> Packed:
    ids, positions, where, targets, seq, starts = [], [], [], [], [], [0]
    for row, (p, c) in enumerate(zip(prompts, completions)):
        offset = starts[-1]
        ids += p + c
        positions += range(len(p) + len(c))
        where += range(offset + len(p) - 1, offset + len(p) + len(c) - 1)  # position j predicts token j+1
        targets += c
        seq += [row] * len(c)
        starts.append(offset + len(p) + len(c))
    lengths = [len(c) for c in completions]
    host = torch.tensor(ids + positions + where + targets + seq + lengths + starts, dtype=torch.long)
    ids_, positions_, where_, targets_, seq_, lengths_, starts_ = to_device(host, device).split(
        [len(ids), len(positions), len(where), len(targets), len(seq), len(lengths), len(starts)])
    return Packed(ids_[None], positions_[None], starts_.int(), max(b - a for a, b in zip(starts, starts[1:])),
                  where_, targets_, seq_, lengths_)


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`, in one copy that does not wait for the GPU: from pageable memory a copy syncs
    the stream, so the GPU would idle while the host builds the next micro-batch; from pinned memory it queues
    behind the kernels before it (the caching host allocator keeps the buffer until the copy is done)."""
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def micro_batches(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Split row indices (kept in order) into micro-batches of at most max_rows rows and, when max_tokens > 0,
    at most max_tokens tokens (a longer single row gets a micro-batch of its own)."""
    batches, current, tokens = [], [], 0
    for index, length in enumerate(lengths):
        if current and (len(current) == max_rows or (max_tokens and tokens + length > max_tokens)):
            batches.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += length
    return batches + ([current] if current else [])


class _ChunkedLogprobs(torch.autograd.Function):
    """logprob of targets under softmax(hidden @ weight.T / T), computed chunk by chunk, in forward and backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, compute_dtype):
        chunk = max(64, CHUNK_ELEMENTS // weight.shape[0])
        w = weight.to(compute_dtype)
        out = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(out)
        for k in range(0, hidden.shape[0], chunk):
            logits = (hidden[k:k + chunk].to(compute_dtype) @ w.T).float() / temperature
            lse[k:k + chunk] = torch.logsumexp(logits, -1)
            out[k:k + chunk] = logits.gather(-1, targets[k:k + chunk, None])[:, 0] - lse[k:k + chunk]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.compute_dtype, ctx.chunk = temperature, compute_dtype, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        w = weight.to(ctx.compute_dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for k in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[k:k + ctx.chunk].to(ctx.compute_dtype)
            logits = (h @ w.T).float() / ctx.temperature
            g = grad_out[k:k + ctx.chunk, None]
            # d logp / d logits = onehot(target) - softmax, times 1/T
            d_logits = -torch.exp(logits - lse[k:k + ctx.chunk, None]) * g
            d_logits.scatter_add_(-1, targets[k:k + ctx.chunk, None], g)
            d_logits = (d_logits / ctx.temperature).to(ctx.compute_dtype)
            if grad_hidden is not None:
                grad_hidden[k:k + ctx.chunk] = (d_logits @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (d_logits.T @ h).float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                     compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """hidden [N, D], weight [V, D] (the LM head), targets [N] -> logprob [N] float32 under softmax(logits / T)."""
    if compute_dtype is None:
        device = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLogprobs.apply(hidden, weight, targets, float(temperature), compute_dtype)


def sequence_logprobs(model, packed: Packed, temperature: float) -> torch.Tensor:
    """Logprob of every completion token of the packed rows under softmax(logits / T): [N] float32.

    With varlen attention (CUDA) the rows stay packed; elsewhere they are laid out right-padded, [B, T], since
    a packed row would make SDPA attend over the whole batch length (quadratic in it) behind a mask."""
    decoder = model.get_decoder()
    if model.config._attn_implementation == VARLEN:
        hidden = decoder(input_ids=packed.ids, position_ids=packed.positions, use_cache=False,
                         cu_seq_lens_q=packed.cu_seqlens, cu_seq_lens_k=packed.cu_seqlens,
                         max_length_q=packed.max_len, max_length_k=packed.max_len).last_hidden_state[0, packed.where]
    else:
        starts = packed.cu_seqlens.long()
        rows = len(starts) - 1
        ids = torch.zeros((rows, packed.max_len), dtype=torch.long, device=packed.ids.device)
        mask = torch.zeros_like(ids)
        for row in range(rows):
            length = int(starts[row + 1] - starts[row])
            ids[row, :length] = packed.ids[0, starts[row]:starts[row + 1]]
            mask[row, :length] = 1
        padded = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        hidden = padded[packed.seq, packed.where - starts[packed.seq]]
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None or getattr(model.config, "final_logit_softcapping", None):
        from grpo.loss import token_logprobs  # heads our chunked kernel does not model

        return token_logprobs(head(hidden), packed.targets, temperature)
    return chunked_logprobs(hidden, head.weight, packed.targets, temperature)


def compute_dtype(device: str) -> torch.dtype:
    """bf16 where the trainer computes in it (GPU, and CPUs with bf16 units), float32 elsewhere: the dtype of the
    trainer's forward copy and of the reference model, so that KL starts at exactly 0."""
    from grpo.model import cpu_has_fast_bf16

    return torch.bfloat16 if device == "cuda" or (device == "cpu" and cpu_has_fast_bf16()) else torch.float32


def autocast(device: str):
    """bf16 autocast where compute_dtype is bf16 (the weights are bf16 there already; autocast keeps the ops it
    lists in float32, the same for the trainer and the reference model); nothing elsewhere."""
    if compute_dtype(device) == torch.bfloat16:
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def score_completions(model, prompts, completions, temperature: float, max_tokens: int = 16384,
                      progress=None) -> list[list[float]]:
    """Per-token logprobs of each completion (reference model, parity checks), in packed micro-batches of at most
    max_tokens tokens, under the trainer's precision path. progress(done_rows) is called as each batch finishes.

    The values stay on the device until the last batch: reading each batch's back (a sync) left the GPU idle while
    the host packed the next one. The host waits only for the batch before the one just queued, for progress."""
    device = next(model.parameters()).device
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    values, queued = [], []  # queued: (event, rows) of batches not yet reported done
    for batch in micro_batches(lengths, len(lengths), max_tokens):
        packed = pack([prompts[i] for i in batch], [completions[i] for i in batch], device)
        with autocast(device.type):
            values.append(sequence_logprobs(model, packed, temperature).float())
        if progress:
            queued.append((_done_event(device), len(batch)))
            while len(queued) > 1:
                event, rows = queued.pop(0)
                event.synchronize()
                progress(rows)
    flat = torch.cat(values).tolist() if values else []
    for _, rows in queued:
        progress(rows)
    ends = list(itertools.accumulate(len(c) for c in completions))  # batches keep the rows' order
    return [flat[end - len(c):end] for end, c in zip(ends, completions)]


def _done_event(device: torch.device):
    """Something whose synchronize() returns once the work queued on `device` so far is done."""
    if device.type != "cuda":
        return types.SimpleNamespace(synchronize=lambda: None)  # CPU work is done when it returns
    event = torch.cuda.Event()
    event.record()
    return event


def load_reference(model: str, device: str):
    """The starting policy in the trainer's compute dtype, its layers run as the trainer's run them (fused norms,
    compiled on CUDA), so that KL starts at 0 (docs/h200_compile measures how close)."""
    from grpo.model import load_model

    reference = load_model(model, device, dtype=compute_dtype(device))
    if use_varlen_attention(reference):  # CUDA: as the trainer's compute copy
        fuse_norms(reference)
        compile_layers(reference)
    return reference


def compiling() -> bool:
    """torch.compile on CUDA unless GRPO_COMPILE=0 (a machine without Triton or a C compiler falls back anyway)."""
    return os.environ.get("GRPO_COMPILE", "1") != "0"


def compile_layers(model) -> int:
    """torch.compile each decoder layer (one compiled graph serves them all; shapes dynamic, as packed micro-batches
    vary in length): fused elementwise kernels around the matmuls, forward and backward. 1B shape on an H200, the
    trainer alone: 48.2% -> 55.4% MFU (docs/h200_compile). A layer that fails to compile runs eagerly (dynamo's
    suppress_errors, with its warning). Returns how many layers are compiled."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not compiling() or layers is None:
        return 0
    torch._dynamo.config.suppress_errors = True
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def fuse_norms(model) -> int:
    """Run the model's Llama-style RMSNorms as torch's rms_norm, one fused kernel each way on CUDA: the modules'
    float32 casts and elementwise passes were ~8% of a 1B training step's GPU time (H200, docs/h200_trainer).
    For a model whose weights and residual stream share one dtype (the trainer's bf16 copy, the reference model:
    both or neither, so that KL starts at exactly 0). Returns how many norms now run fused."""
    fused = 0
    for module in model.modules():
        if type(module).__name__ in FUSABLE_NORMS:
            module.forward = types.MethodType(_fused_rms_norm, module)
            fused += 1
    return fused


def _fused_rms_norm(self, hidden: torch.Tensor) -> torch.Tensor:
    # outside autocast, which would run rms_norm in float32 and hand a float32 stream on
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.nn.functional.rms_norm(hidden, self.weight.shape, self.weight, self.variance_epsilon)


def use_varlen_attention(model) -> bool:
    """On CUDA, switch the model to flash-attention over packed rows (torch's varlen kernel). Elsewhere the
    model keeps SDPA, which transformers masks per row from the restarting position ids."""
    if next(model.parameters()).device.type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    native_gqa = "enable_gqa" in params

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # [1, H, L, D] -> [L, H, D]; rows are delimited by cu_seq_lens. Flash attention takes bf16/fp16 only:
        # rotary embeddings hand float32 queries and keys over under autocast (and without it, e.g. the probe)
        dtype = query.dtype
        q, k, v = (x[0].transpose(0, 1).to(torch.bfloat16) for x in (query, key, value))
        extra = dict(causal)
        if q.shape[1] != k.shape[1]:
            if native_gqa:
                extra["enable_gqa"] = True
            else:
                k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
        out = varlen_attn(q, k, v, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], kwargs["max_length_q"],
                          kwargs["max_length_k"], scale=scaling, **extra)
        return out[None].to(dtype), None

    AttentionInterface.register(VARLEN, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, flash_attention_mask)
    model.set_attn_implementation(VARLEN)
    return True
