"""The trainer on the tiny model: direction of an update, exact normalisation over micro-batches, metrics,
numerics, background checkpoints and the learning-rate schedule."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch

from grpo.artifacts import CHECKPOINT_INFO, checkpoint_info
from grpo.checkpointing import OPTIMIZER_STATE, PINNED_BY_REGISTER, host_allocator_conf
from grpo.config import Config, Optim
from grpo.errors import DataError, NumericsError
from grpo.model import load_model
from grpo.scoring import score_completions
from grpo.trainer import Trainer, learning_rate


def _rows(tokenizer, model, count=2, advantages=(1.0, -1.0)):
    """Rows as annotate writes them: sampler and reference logprobs from the model itself (ratio 1, KL 0)."""
    prompt = tokenizer("Q: 2+2?\nA:", add_special_tokens=False)["input_ids"]
    texts = [" \\boxed{4}", " 5 5 5", " four", " \\boxed{5} or so", " 4", " it is 4 I think"]
    completions = [tokenizer(texts[k % len(texts)], add_special_tokens=False)["input_ids"] for k in range(count)]
    logps = score_completions(model, [prompt] * count, completions, 1.0)
    return [dict(prompt_ids=prompt, completion_ids=c, logprobs=lp, ref_logprobs=lp, temperature=1.0,
                 max_new_tokens=16, iteration=0, advantage=advantages[k % len(advantages)])
            for k, (c, lp) in enumerate(zip(completions, logps))]


def _train(trainer, rows, iteration=0):
    from grpo.trainer import drain

    steps = []
    summary = drain(trainer.train(rows, iteration, seed=0, total_steps=100), steps.append)
    return steps, summary


def test_one_step_raises_positive_and_lowers_negative(tiny_model_dir, tokenizer):
    trainer = Trainer(tiny_model_dir, Optim(learning_rate=1e-2, warmup_steps=0, kl_coef=0.0), "cpu")
    rows = _rows(tokenizer, trainer.compute)
    steps, summary = _train(trainer, rows)
    assert summary["optimizer_steps"] == 1 and [e["step"] for e in steps] == [1]
    assert steps[0]["metrics"]["ratio_mean"] == pytest.approx(1, abs=1e-4)  # first step: policy = sampler
    new = score_completions(trainer.compute, [r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], 1.0)
    assert sum(new[0]) > sum(rows[0]["logprobs"]) and sum(new[1]) < sum(rows[1]["logprobs"])


@pytest.mark.parametrize("reduction", ["seq_mean", "token_mean", "seq_sum"])
def test_step_gradient_does_not_depend_on_how_the_step_is_cut(tiny_model_dir, tokenizer, reduction, monkeypatch):
    """10 rows in one optimiser step: one micro-batch of 10, micro-batches of 8 + 2, or cut by a token cap,
    must give the same gradient (SGD with lr 1 makes the weight change the gradient itself)."""
    monkeypatch.setenv("GRPO_CPU_BF16", "0")  # float32: bf16 rounding depends on the batch shape
    deltas = []
    for batch, passes, cap in ((10, 1, 0), (8, 2, 0), (16, 1, 40)):
        optim = Optim(learning_rate=1.0, warmup_steps=0, grad_clip=1e9, kl_coef=0.05, train_batch_size=batch,
                      gradient_accumulation_passes=passes, max_tokens_per_micro_batch=cap, loss_reduction=reduction)
        trainer = Trainer(tiny_model_dir, optim, "cpu")
        trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=1.0)
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        rows = _rows(tokenizer, load_model(tiny_model_dir, "cpu", dtype=torch.float32), 10,
                     advantages=(1.0, -0.5, 0.0, 2.0, -1.0))
        for r in rows[::3]:  # a policy that drifted from the sampler: ratios away from 1, some clipped
            r["logprobs"] = [x + 0.3 for x in r["logprobs"]]
        steps, summary = _train(trainer, rows)
        assert summary["optimizer_steps"] == 1
        deltas.append({k: v - before[k] for k, v in trainer.model.state_dict().items()})
    for other in deltas[1:]:
        for name, delta in deltas[0].items():
            assert torch.allclose(delta, other[name], atol=1e-6, rtol=1e-4), name


def test_ratio_max_is_the_max_over_micro_batches(tiny_model_dir, tokenizer):
    trainer = Trainer(tiny_model_dir, Optim(train_batch_size=1, gradient_accumulation_passes=4), "cpu")
    steps, _ = _train(trainer, _rows(tokenizer, trainer.compute, 4))
    m = steps[0]["metrics"]
    assert m["ratio_max"] == pytest.approx(1.0, abs=1e-4) and m["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert m["sequences"] == 4


def test_nan_stops_before_anything_is_kept(tiny_model_dir, tokenizer):
    trainer = Trainer(tiny_model_dir, Optim(train_batch_size=1, gradient_accumulation_passes=1), "cpu")
    rows = _rows(tokenizer, trainer.compute, 1, advantages=(math.nan,))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NumericsError, match="nothing of it was kept"):
        _train(trainer, rows)
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_bf16_compute_copy_follows_the_float32_master(tiny_model_dir, tokenizer, monkeypatch):
    """Where the trainer computes in bf16, forward and backward run on a bf16 copy; AdamW updates the float32
    master from float32 gradients summed over micro-batches, and the copy is the master rounded after each step."""
    monkeypatch.setenv("GRPO_CPU_BF16", "1")
    trainer = Trainer(tiny_model_dir, Optim(learning_rate=1e-3, warmup_steps=0, train_batch_size=1,
                                            gradient_accumulation_passes=4), "cpu")
    assert trainer.compute is not trainer.model
    assert {p.dtype for p in trainer.compute.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    grads, add = [], trainer._grads_to_master

    def add_and_record():  # the master's gradients after each micro-batch
        add()
        grads.append([p.grad.clone() for p in trainer.model.parameters()])

    trainer._grads_to_master = add_and_record
    _train(trainer, _rows(tokenizer, trainer.compute, 4))
    assert len(grads) == 4 and all(g.dtype == torch.float32 for g in grads[-1])
    assert any(not torch.equal(a, b) for a, b in zip(grads[0], grads[-1]))  # the 4 micro-batches added up
    assert all(p.grad is None for p in trainer.compute.parameters())
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    for master, compute in zip(trainer.model.parameters(), trainer.compute.parameters()):
        assert torch.equal(compute, master.detach().to(torch.bfloat16))


def test_rows_annotate_did_not_score_are_not_trained(tiny_model_dir, tokenizer):
    trainer = Trainer(tiny_model_dir, Optim(), "cpu")
    rows = _rows(tokenizer, trainer.compute, 4)
    rows[3]["ref_logprobs"] = None  # a flat group's row
    _, summary = _train(trainer, rows)
    assert (summary["sequences_trained"], summary["sequences_skipped"]) == (3, 1)


def test_rows_annotated_without_a_reference_train_as_kl_off_and_are_refused_with_kl_on(tiny_model_dir, tokenizer):
    """kl_coef 0 in main skips the reference model: rows marked `train` with no reference logprobs must train to
    the same weights as scored rows at kl_coef 0 (the KL term is then 0 either way), with no KL logged."""
    weights, summaries = [], []
    for scored in (True, False):
        trainer = Trainer(tiny_model_dir, Optim(learning_rate=1e-2, warmup_steps=0, kl_coef=0.0), "cpu")
        rows = _rows(tokenizer, load_model(tiny_model_dir, "cpu", dtype=torch.float32), 4)
        for row in rows:
            row["ref_logprobs"] = [lp - 1.0 for lp in row["ref_logprobs"]] if scored else None
            row["train"] = True
        rows[3]["train"] = False  # a flat group's row: not trained either way
        steps, summary = _train(trainer, rows)
        weights.append(trainer.model.state_dict())
        summaries.append((summary["sequences_trained"], "kl" in steps[0]["metrics"], "last_kl" in summary))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert summaries == [(3, True, True), (3, False, False)]
    trainer = Trainer(tiny_model_dir, Optim(kl_coef=0.01), "cpu")
    with pytest.raises(DataError, match="pass kl_coef=0, or annotate the rollouts again"):
        _train(trainer, rows)


def test_background_checkpoint_is_complete_and_resumes_step_and_optimizer(tiny_model_dir, tokenizer, tmp_path):
    trainer = Trainer(tiny_model_dir, Optim(train_batch_size=1, gradient_accumulation_passes=1), "cpu")
    rows = _rows(tokenizer, trainer.compute, 2)
    _train(trainer, rows)
    target = tmp_path / "run" / "checkpoints" / "iter-0000"
    trainer.save(target)  # background
    _train(trainer, rows, iteration=1)  # training goes on while it is written
    trainer.wait_saved()
    info = checkpoint_info(target)
    assert (info["iteration"], info["global_step"]) == (0, 2)
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".tmp-")]
    saved = torch.load(target / OPTIMIZER_STATE)  # as a run whose AdamW ran other kernels would have saved it
    saved["optimizer"]["param_groups"][0]["foreach"] = True
    torch.save(saved, target / OPTIMIZER_STATE)
    resumed = Trainer(tiny_model_dir, trainer.optim, "cpu", checkpoint=str(target))
    assert resumed.step == 2 and resumed.optimizer.state_dict()["state"]
    group = resumed.optimizer.param_groups[0]
    assert group["fused"] and group["foreach"] is None  # this run's choice (fused), not the saver's
    later = tmp_path / "run" / "checkpoints" / "iter-0001"
    trainer.save(later, background=False)
    assert not target.exists() and json.loads((later / CHECKPOINT_INFO).read_text())["global_step"] == 4


@pytest.mark.parametrize("user, expected", [
    ("", PINNED_BY_REGISTER),
    ("expandable_segments:True", "expandable_segments:True," + PINNED_BY_REGISTER),
    ("pinned_use_background_threads:True", "pinned_use_background_threads:True"),  # the user chose how to pin
])
def test_trainer_processes_pin_host_memory_by_registering_it(user, expected):
    assert host_allocator_conf(user) == expected


def test_trainer_old_logprobs_and_the_sampler_gap(tiny_model_dir, tokenizer):
    trainer = Trainer(tiny_model_dir, Optim(old_logprobs="trainer", tis_cap=2.0), "cpu")
    rows = _rows(tokenizer, trainer.compute, 4)
    for r in rows:
        r["logprobs"] = [x - 0.1 for x in r["logprobs"]]  # the engine sampled from a slightly different model
    steps, summary = _train(trainer, rows)
    assert steps[0]["metrics"]["ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # old = the trainer itself
    assert summary["sampler_gap_mean"] == pytest.approx(0.1, abs=1e-4)
    assert summary["sampler_outside_clip"] == 0.0


def test_learning_rate_schedule_hand_values():
    constant = Optim(learning_rate=1.0, warmup_steps=4)
    assert [learning_rate(constant, s, 100) for s in (0, 1, 3, 50)] == [0.25, 0.5, 1.0, 1.0]
    cosine = Optim(learning_rate=1.0, warmup_steps=2, lr_schedule="cosine")
    assert learning_rate(cosine, 2, 12) == pytest.approx(1.0)
    assert learning_rate(cosine, 7, 12) == pytest.approx(0.5)  # half way through the decay
    assert learning_rate(cosine, 12, 12) == pytest.approx(0.0, abs=1e-12)


def test_config_optim_section_feeds_the_trainer():
    assert isinstance(Config().optim, Optim) and Path(__file__).exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norms_give_the_models_own_logprobs_and_gradients(tiny_model_dir, tokenizer, dtype):
    """The trainer's compute copy and the reference model run their RMSNorms fused on CUDA; the same logprobs and
    gradients as the modules' own forward (here on the CPU, where rms_norm is not fused but the wiring is)."""
    from grpo.scoring import fuse_norms, pack, sequence_logprobs

    own, fused = (load_model(tiny_model_dir, "cpu", dtype=dtype) for _ in range(2))
    for model in (own, fused):  # norm weights start at 1: give them values, the same in both models
        generator = torch.Generator().manual_seed(0)
        for name, weight in model.named_parameters():
            if "norm" in name:
                weight.data = (0.5 + torch.rand(weight.shape, generator=generator)).to(dtype)
    assert fuse_norms(fused) == 2 * own.config.num_hidden_layers + 1  # two per layer and the final one
    prompts = [tokenizer.encode("What is 2 plus 3?"), tokenizer.encode("Seven")]
    completions = [tokenizer.encode(" It is \\boxed{5}."), tokenizer.encode(" eight nine ten")]
    values = []
    for model in (own, fused):
        logprobs = sequence_logprobs(model, pack(prompts, completions, "cpu"), 1.0)
        logprobs.sum().backward()
        values.append((logprobs.detach().float(), model.model.norm.weight.grad.float(),
                       model.model.layers[0].input_layernorm.weight.grad.float()))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(*values):
        assert torch.allclose(a, b, rtol=tolerance, atol=tolerance), (a - b).abs().max()
    assert values[0][0].abs().sum() > 0 and values[0][1].abs().sum() > 0  # something was compared


def test_clipped_step_is_clip_grad_norm_then_step_and_skips_a_non_finite_norm():
    """Fused AdamW clips inside its kernel: the weights of clip_grad_norm_ then step (to rounding), with the norm
    above and below the clip; a gradient whose norm is not finite leaves weights and AdamW's state as they were."""
    from grpo.trainer import clipped_step

    torch.manual_seed(0)
    for max_norm in (0.5, 1e6):
        expected, mine = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
        mine.load_state_dict(expected.state_dict())
        optims = [torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1, fused=True) for m in (expected, mine)]
        for _ in range(3):
            x = torch.randn(5, 8)
            for m in (expected, mine):
                (m(x) ** 2).sum().backward()
            norm = torch.nn.utils.clip_grad_norm_(expected.parameters(), max_norm)
            optims[0].step()
            assert (norm > max_norm) == (max_norm == 0.5)
            assert clipped_step(optims[1], list(mine.parameters()), max_norm).item() == pytest.approx(norm.item())
            for optim in optims:
                optim.zero_grad()
            for a, b in zip(expected.parameters(), mine.parameters()):
                assert torch.allclose(a, b, rtol=0, atol=1e-6)
    weights, state = copy.deepcopy(mine.state_dict()), copy.deepcopy(optims[1].state_dict()["state"])
    mine.weight.grad, mine.bias.grad = torch.full_like(mine.weight, math.inf), torch.zeros_like(mine.bias)
    assert math.isinf(clipped_step(optims[1], list(mine.parameters()), 1.0).item())
    assert all(torch.equal(v, weights[k]) for k, v in mine.state_dict().items())
    after = optims[1].state_dict()["state"]
    assert all(torch.equal(after[p][k], state[p][k]) for p in state for k in state[p])


def test_scoring_in_many_micro_batches_gives_each_row_its_own_logprobs_and_reports_every_row(tiny_model_dir,
                                                                                              tokenizer):
    """score_completions keeps every micro-batch's values on the device to the end: rows of different lengths cut
    into micro-batches of a few tokens get the logprobs they get scored one at a time, in order, and progress adds
    up to the rows."""
    model = load_model(tiny_model_dir, "cpu", dtype=torch.float32)
    rows = _rows(tokenizer, model, 5)
    prompts, completions = [r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows]
    done = []
    cut = score_completions(model, prompts, completions, 0.7, max_tokens=len(prompts[0]) + 3, progress=done.append)
    alone = [score_completions(model, [p], [c], 0.7)[0] for p, c in zip(prompts, completions)]
    assert len(done) > 2 and sum(done) == 5
    assert [len(v) for v in cut] == [len(c) for c in completions]
    for got, want in zip(cut, alone):
        assert got == pytest.approx(want, abs=1e-5)
