"""Our torch sampler over a transformers model: prefill each prompt once, fan it out `n` times in the KV cache,
draw from softmax(logits / T) explicitly (no top-k / top-p), and drop finished rows. On a GPU with a
Llama-family model the decode loop runs on a preallocated cache with CUDA graphs (`static_decode`)."""
from __future__ import annotations

import inspect
import os
import time
from typing import Iterable

import torch

from grpo.engines.base import Completion, GenerationStats, Probe, completions, draw, stop_ids


class TorchEngine:
    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 64, progress: bool = True):
        from grpo.engines.static_decode import StaticDecoder, supported

        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.progress = progress
        self.stop_ids = stop_ids(model.generation_config.eos_token_id, tokenizer)
        self.stats = GenerationStats()
        self.version = 0
        self.tolerance = 1e-3 if model.dtype == torch.float32 else 0.05  # probe check: float32 vs bf16 serving
        # one preallocated cache for every call (rows and prompt widths are bucketed), GPU + Llama family only
        self.static = StaticDecoder(model, batch_size) if supported(model) else None
        # transformers renamed `past_key_values` to `cache` (5.2x); accept either release
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @classmethod
    def load(cls, engine_cfg, model: str, device: str, checkpoint: str = "", progress: bool = True):
        from grpo.model import load_model, load_tokenizer

        return cls(load_model(model, device, checkpoint=checkpoint), load_tokenizer(model),
                   engine_cfg.generation_batch_size, progress)

    @torch.no_grad()
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy HF-named tensors into the served parameters (tied weights arrive once or twice: same storage)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for name, tensor in weights:
            params[name].copy_(tensor)
        self.version = version

    @torch.no_grad()
    def probe_logprobs(self, probe: Probe) -> list[float]:
        ids = torch.tensor([probe.prompt + probe.completion], device=self.model.device)
        logits = self.model(input_ids=ids, use_cache=False).logits[0, len(probe.prompt) - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(probe.prompt):, None])[:, 0]
        return logp.tolist()

    def release(self) -> None:
        if self.static:
            self.static.release()

    def generate(self, prompts: list[list[int]], n: int, temperature: float, max_new_tokens: int,
                 seed: int = 0) -> list[list[Completion]]:
        from tqdm.auto import tqdm

        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        per_chunk = max(1, self.batch_size // n)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
        widest = self._bucket(max(map(len, prompts), default=1))
        results: list[list[Completion]] = [[] for _ in prompts]
        start, tokens = time.perf_counter(), 0
        label = "evaluate (greedy)" if temperature == 0 else f"rollout (T={temperature:g}, {n} each)"
        with tqdm(total=len(prompts) * n, desc=label, unit="seq", leave=False,
                  disable=None if self.progress else True) as bar:  # None: bars on a terminal only
            k = 0
            while k < len(order):
                chunk = order[k:k + per_chunk]
                try:
                    if self.static:  # before the prefill, for the call's widest chunk: never grown beside a cache
                        self.static.reserve(len(chunk) * n, widest + max_new_tokens)
                    outs = self._decode([prompts[i] for i in chunk], n, temperature, max_new_tokens, generator)
                except torch.OutOfMemoryError:
                    if len(chunk) == 1:
                        raise
                    per_chunk = self._shrink(len(chunk), n)
                    continue
                for j, i in enumerate(chunk):
                    results[i] = outs[j * n:(j + 1) * n]
                    tokens += sum(len(c.token_ids) for c in results[i])
                bar.update(len(chunk) * n)
                k += len(chunk)
        self.stats = GenerationStats(tokens, time.perf_counter() - start)
        return results

    def _shrink(self, prompts: int, n: int) -> int:
        """Out of memory on a chunk (a longer prompt can grow the KV buffer while the prefill's cache is alive):
        free the cache, halve the prompts per chunk for this and every later call, say so, and go on, rather
        than lose a long run to one peak."""
        import warnings

        if self.static:
            self.static.release()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        per_chunk = max(1, prompts // 2)
        self.batch_size = per_chunk * n
        warnings.warn(f"generation ran out of memory; going on with {self.batch_size} sequences at once (lower "
                      "generation_batch_size or raise gpu_memory_utilization to avoid this)", RuntimeWarning,
                      stacklevel=3)
        return per_chunk

    def _decode(self, prompts, n, temperature, max_new_tokens, generator) -> list[Completion]:
        from transformers import DynamicCache

        limit = os.environ.get("GRPO_FAILPOINT", "")
        if limit.startswith("oom-above:") and len(prompts) * n > int(limit.split(":")[1]):  # tests: a full GPU
            raise torch.OutOfMemoryError(f"failpoint: {len(prompts) * n} rows")

        device = self.model.device
        width = self._bucket(max(map(len, prompts)))
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left padding: every row ends at the same column
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        stop = torch.tensor(self.stop_ids, device=device)
        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{self._cache_arg: cache})
            # one prefill per prompt, then n copies of its cache (the static path copies straight into its rows)
            # and of its next-token logits
            logits = out.logits[:, -1].float().repeat_interleave(n, 0)
            mask = mask.repeat_interleave(n, 0)
            next_pos = positions[:, -1].repeat_interleave(n, 0) + 1
            if self.static:
                return self.static.decode(cache, n, logits, mask, next_pos, width, temperature, max_new_tokens,
                                          generator, stop, pad)
            cache.batch_repeat_interleave(n)
            return self._decode_dynamic(cache, logits, mask, next_pos, temperature, max_new_tokens, generator,
                                        stop, pad)

    def _bucket(self, width: int) -> int:
        """Prompt widths rounded up to 64 on the static path, so that chunks share CUDA graphs."""
        return -(-width // 64) * 64 if self.static else width

    def _decode_dynamic(self, cache, logits, mask, next_pos, temperature, max_new_tokens, generator, stop, pad):
        device = logits.device
        rows = torch.arange(len(logits), device=device)  # which output row each batch row is
        tokens = torch.full((len(rows), max_new_tokens), pad, dtype=torch.long, device=device)
        logps = torch.zeros((len(rows), max_new_tokens), device=device)
        lengths = torch.full((len(rows),), max_new_tokens, device=device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token, logp = draw(logits, temperature, generator)
            tokens[rows, step] = token
            logps[rows, step] = logp
            finished = torch.isin(token, stop)
            lengths[rows[finished]] = step + 1  # the stop token is part of the completion
            done[rows[finished]] = True
            if step + 1 == max_new_tokens or finished.all():
                break
            if finished.any():  # drop finished rows so later steps cost less
                keep = (~finished).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows, token, mask, next_pos = rows[keep], token[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], -1)
            out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                             use_cache=True, **{self._cache_arg: cache})
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
        return completions(tokens, logps, lengths, done)
