"""Rollout engines behind one interface (`base.Engine`): our torch sampler, and vLLM where it is installed."""
from __future__ import annotations

from grpo.engines.base import probe_gap, served_weights_match
from grpo.errors import ModelError


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def make_engine(engine_cfg, model: str, device: str, checkpoint: str = "", seed: int = 0, progress: bool = True):
    """The engine named by engine_cfg.backend ('auto' = vLLM when importable, else our torch sampler), serving
    `checkpoint` ('' = the base model)."""
    from grpo.model import check_checkpoint, resolve

    resolve(model)  # a missing model or checkpoint fails in one line before an engine is imported or built
    if checkpoint:
        check_checkpoint(model, checkpoint)
    backend = engine_cfg.backend
    if backend == "vllm" and not vllm_available():
        raise ModelError("backend=vllm but vllm is not installed; pip install '.[vllm]' or pass backend=hf")
    if backend in ("auto", "vllm") and vllm_available():
        from grpo.engines.vllm_engine import VLLMEngine

        return VLLMEngine(engine_cfg, model, device, checkpoint, seed)
    from grpo.engines.torch_engine import TorchEngine

    return TorchEngine.load(engine_cfg, model, device, checkpoint, progress)


def publish(engine, weights, version: int, probe, expected: list[float], floor: float = 0.0) -> dict:
    """New weights into a running engine, verified: weights() yields (HF name, tensor); expected is the trainer's
    probe logprobs for them; floor is their expected precision difference (the probe gap measured while engine and
    trainer held the same weights, or the policy's sensitivity to the serving precision now, which grows as
    training sharpens it), so the check allows max(engine.tolerance, 2 x floor). In place first; if the probe
    disagrees, the engine is rebuilt on the weights (with a warning, once: an engine that cannot update in place is
    rebuilt directly from then on). Returns timings."""
    import time
    import warnings

    started = time.perf_counter()
    tolerance = max(engine.tolerance, 2 * floor)
    report = lambda served, rebuilt: {"handoff_seconds": time.perf_counter() - started,  # noqa: E731
                                      "engine_rebuilt": rebuilt, "probe_gap": probe_gap(served, expected)}
    if getattr(engine, "in_place", True):
        engine.update_weights(weights(), version)
        served = engine.probe_logprobs(probe)
        if served_weights_match(served, expected, tolerance):
            return report(served, 0)
        if not hasattr(engine, "rebuild"):
            raise ModelError(f"the {engine.name} engine does not serve the weights the trainer handed over (probe "
                             f"gap {probe_gap(served, expected):.3g} nats, allowed {tolerance:.3g}); the run can "
                             "be resumed; please report this with its log")  # engines without rebuild: hf, group
        warnings.warn(f"{engine.name} did not take new weights in place (probe gap {probe_gap(served, expected):.3g} "
                      "nats); it is rebuilt on them instead, now and from here on", RuntimeWarning, stacklevel=2)
        engine.in_place = False
    engine.rebuild(weights(), version)
    served = engine.probe_logprobs(probe)
    if not served_weights_match(served, expected, tolerance):
        raise ModelError(f"the rebuilt engine does not serve the trainer's weights either (probe gap "
                         f"{probe_gap(served, expected):.3g} nats, allowed {tolerance:.3g}); pass backend=hf")
    return report(served, 1)
