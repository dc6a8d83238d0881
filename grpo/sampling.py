"""Rollout engines. Each returns, per prompt, `n` completions with the logprob of every sampled token
under the distribution actually sampled from: softmax(logits / T), no top-k / top-p."""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    truncated: bool  # hit max_new_tokens before an end-of-sequence token


@dataclass
class GenerationStats:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class HFSampler:
    """Our torch sampler over a transformers model: prefill each prompt once, fan it out `n` times in the
    KV cache, decode with an explicit softmax(logits / T) draw, and drop finished rows from the batch."""

    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 64, show_progress: bool = True, use_static: bool = True):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.use_static = use_static  # GPU + Llama family: static cache and CUDA graphs (grpo.static_decode)
        self._decoder, self._decoder_key = None, None
        self.show_progress = show_progress
        self.stop_ids = _stop_ids(model, tokenizer)
        self.stats = GenerationStats()
        # transformers renamed `past_key_values` to `cache` (5.2x); accept either release
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def load_weights(self, folder: str | Path) -> None:
        """Serve a new checkpoint in place (same architecture), without rebuilding the engine."""
        from transformers import AutoModelForCausalLM

        fresh = AutoModelForCausalLM.from_pretrained(folder, dtype=self.model.dtype)
        self.model.load_state_dict(fresh.state_dict())

    def generate(self, prompts: list[list[int]], n: int, temperature: float, max_new_tokens: int,
                 seed: int = 0) -> list[list[Completion]]:
        import torch
        from tqdm.auto import tqdm

        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        per_chunk = max(1, self.batch_size // n)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
        results: list[list[Completion]] = [[] for _ in prompts]
        start = time.perf_counter()
        tokens = 0
        with tqdm(total=len(prompts) * n, desc=f"generate T={temperature}", unit="seq", leave=False,
                  disable=not self.show_progress) as bar:
            for k in range(0, len(order), per_chunk):
                chunk = order[k:k + per_chunk]
                outs = self._decode([prompts[i] for i in chunk], n, temperature, max_new_tokens, generator)
                for j, i in enumerate(chunk):
                    results[i] = outs[j * n:(j + 1) * n]
                    tokens += sum(len(c.token_ids) for c in results[i])
                bar.update(len(chunk) * n)
        self.stats = GenerationStats(tokens, time.perf_counter() - start)
        return results

    def _decode(self, prompts, n, temperature, max_new_tokens, generator) -> list[Completion]:
        import torch

        from grpo import static_decode

        device = self.model.device
        static = self.use_static and static_decode.supported(self.model)
        width = max(map(len, prompts))
        if static:  # round up so that chunks share one preallocated cache and CUDA graph
            width = -(-width // 64) * 64
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
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{self._cache_arg: cache})
            # one prefill per prompt, then n copies of its cache and its next-token logits
            cache.batch_repeat_interleave(n)
            logits = out.logits[:, -1].float().repeat_interleave(n, 0)
            mask = mask.repeat_interleave(n, 0)
            next_pos = positions[:, -1].repeat_interleave(n, 0) + 1
            if static:
                return self._decode_static(cache, logits, mask, next_pos, width, temperature, max_new_tokens,
                                           generator, stop)
            rows = torch.arange(len(prompts) * n, device=device)  # which output row each batch row is
            tokens = torch.full((len(rows), max_new_tokens), pad, dtype=torch.long, device=device)
            logps = torch.zeros((len(rows), max_new_tokens), device=device)
            lengths = torch.full((len(rows),), max_new_tokens, device=device)
            done = torch.zeros(len(rows), dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                token, logp = _draw(logits, temperature, generator)
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
        return _completions(tokens, logps, lengths, done)

    def _decode_static(self, cache, logits, mask, next_pos, width, temperature, max_new_tokens, generator, stop):
        """Lock-step decoding on a preallocated cache, one CUDA graph replay per token (GPU, Llama family)."""
        import torch

        from grpo.static_decode import StaticDecoder

        rows = len(logits)
        key = (rows, width, max_new_tokens)
        if self._decoder_key != key:
            self._decoder = None
            torch.cuda.empty_cache()
            self._decoder, self._decoder_key = StaticDecoder(self.model, rows, width, max_new_tokens), key
        decoder = self._decoder
        decoder.prefill(cache, mask, next_pos)
        del cache
        tokens = torch.full((rows, max_new_tokens), self.tokenizer.pad_token_id, dtype=torch.long,
                            device=logits.device)
        logps = torch.zeros((rows, max_new_tokens), device=logits.device)
        lengths = torch.full((rows,), max_new_tokens, device=logits.device)
        done = torch.zeros(rows, dtype=torch.bool, device=logits.device)
        for step in range(max_new_tokens):
            token, logp = _draw(logits, temperature, generator)
            tokens[:, step] = token
            logps[:, step] = logp
            finished = torch.isin(token, stop) & ~done
            lengths = torch.where(finished, step + 1, lengths)
            done |= finished
            if step + 1 == max_new_tokens or (step % 8 == 7 and bool(done.all())):  # sync rarely
                break
            logits = decoder.step(token)
        return _completions(tokens, logps, lengths, done)


def _draw(logits, temperature: float, generator):
    """Next token and its logprob under softmax(logits / T); T = 0 is greedy."""
    import torch

    logp = torch.log_softmax(logits if temperature == 0 else logits / temperature, -1)
    if temperature == 0:
        token = logp.argmax(-1)
    else:
        token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def _completions(tokens, logps, lengths, done) -> list[Completion]:
    tokens, logps, lengths, done = tokens.tolist(), logps.tolist(), lengths.tolist(), done.tolist()
    return [Completion(tokens[r][:int(lengths[r])], logps[r][:int(lengths[r])], not done[r])
            for r in range(len(tokens))]


def _stop_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids]) | {tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


def make_sampler(cfg, device: str, checkpoint: str = "", show_progress: bool = True):
    """The rollout engine named by cfg.backend ('auto' = vLLM when importable, else our torch sampler)."""
    from grpo.model import load_model, load_tokenizer

    backend = cfg.backend
    if backend in ("auto", "vllm"):
        try:
            from grpo.vllm_sampler import VLLMSampler, vllm_available
        except ImportError:
            vllm_available = None
        if vllm_available and vllm_available():
            return VLLMSampler(cfg, device, checkpoint)
        if backend == "vllm":
            from grpo.model import ModelError

            raise ModelError("backend=vllm but vllm is not installed; pip install '.[vllm]' or pass backend=hf")
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, device, checkpoint=checkpoint)
    return HFSampler(model, tokenizer, cfg.generation_batch_size, show_progress)
