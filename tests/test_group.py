"""The trainer as a torch.distributed group (grpo.group) on CPU processes and the gloo backend, launched by the
real torchrun: ranks must train to the same weights as one process, and generate and score as one engine
does; two rendezvous agents on this host stand in for two machines (one rank, and two), and a rank killed takes
the group down.
Sharded (FSDP2), two ranks train, checkpoint and resume as one process does, and feed two engine ranks by broadcast."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port

from grpo.artifacts import checkpoint_path, write_jsonl
from grpo.config import Config, Group, Optim
from grpo.engine_ranks import EngineRanks
from grpo.engines.base import Probe
from grpo.group import join_command
from grpo.engines.torch_engine import TorchEngine
from grpo.model import load_model
from grpo.scoring import score_completions
from grpo.trainer import drain
from grpo.trainer_process import ROOT, TrainerClient
from grpo.workspace import place


def _rows(tokenizer, model):
    """Seven rows of different lengths and advantages, as annotate writes them (ratio 1, KL 0 at the start)."""
    prompt = tokenizer("Q: 2+2?\nA:", add_special_tokens=False)["input_ids"]
    texts = [" \\boxed{4}", " 5 5 5", " four", " \\boxed{5} or so", " 4", " it is 4 I think", " 22"]
    completions = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    logps = score_completions(model, [prompt] * len(texts), completions, 1.0)
    return [dict(prompt_ids=prompt, completion_ids=c, logprobs=lp, ref_logprobs=lp, temperature=1.0,
                 max_new_tokens=16, iteration=0, advantage=[1.0, -1.0, 0.5, -0.5, 1.5, -1.5, 0.25][k])
            for k, (c, lp) in enumerate(zip(completions, logps))]


# one row per micro-batch: a step of 3 rows gives one rank 2 micro-batches and the other 1 (a sharded rank pads)
OPTIM = Optim(learning_rate=1e-2, warmup_steps=0, train_batch_size=1, gradient_accumulation_passes=4)


def _train(model_dir, annotated, out, group, checkpoint=""):
    client = TrainerClient(timeout=120)
    ready = client.start(model_dir, OPTIM, "cpu", checkpoint, group=group, batch_size=8)["ready"]
    summaries = [drain(client.train(annotated, 0, 0, 10)) for _ in range(2)]  # two iterations: AdamW state too
    client.export(out)
    return client, ready, summaries


@pytest.fixture(scope="module")
def alone(tiny_model_dir, tokenizer, tmp_path_factory):
    """One trainer process: two iterations on the rows (exported to one/), a checkpoint of them, then a third
    (exported to one3/); float32 throughout, so a group's sums differ from it only in their order."""
    folder = tmp_path_factory.mktemp("alone")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRPO_CPU_BF16", "0")
        model = load_model(tiny_model_dir, "cpu", dtype=torch.float32)
        rows = _rows(tokenizer, model)
        write_jsonl(rows, folder / "annotated.jsonl")
        client, ready, summaries = _train(tiny_model_dir, folder / "annotated.jsonl", folder / "one", Group(ranks=1))
        client.save(checkpoint_path(folder, 1))
        client.wait_saved()
        drain(client.train(folder / "annotated.jsonl", 2, 0, 10))
        client.export(folder / "one3")
        client.close()
    return {"folder": folder, "model": model, "rows": rows, "ready": ready, "summaries": summaries}


def _same_training(alone: list[dict], grouped: list[dict], ours: Path, theirs: Path) -> None:
    """Step metrics (the whole step's, summed over the ranks) and exported weights as one process's."""
    for a, b in zip(alone, grouped):
        for key in ("last_loss", "last_kl", "last_clip_fraction", "last_ratio_mean", "last_ratio_max",
                    "last_grad_norm", "sampler_gap_mean", "sampler_gap_max", "sequences_trained",
                    "optimizer_steps"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    weights = [load_file(side / "model.safetensors") for side in (theirs, ours)]
    assert weights[0].keys() == weights[1].keys()
    # Adam turns float-order noise in near-zero gradients into steps of up to lr: a few elements may differ
    diffs = torch.cat([(weights[1][k].float() - weights[0][k].float()).abs().reshape(-1) for k in weights[0]])
    assert (diffs > 1e-3).float().mean() < 1e-3 and diffs.max() < 2e-2


@pytest.mark.slow
def test_ranks_on_two_machines_train_generate_and_score_as_one_process(alone, tiny_model_dir, tokenizer, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("GRPO_CPU_BF16", "0")  # float32 on both sides: sums differ only in their order
    model, rows, annotated = alone["model"], alone["rows"], alone["folder"] / "annotated.jsonl"
    # two machines: main's node 0 with one rank and a second rendezvous agent on this host as node 1 with two
    # (machines may run different numbers of ranks: a step's 4 rows split 2 / 1 / 1)
    group = Group(ranks=1, nodes=2, rendezvous=f"127.0.0.1:{free_port()}")
    command = join_command(group).replace("--node-rank K", "--node-rank 1").split()
    command[command.index("--nproc-per-node") + 1] = "2"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    node1 = subprocess.Popen([sys.executable, *command[1:]], stdin=subprocess.DEVNULL, env=env)
    two, ready_two, grouped = _train(tiny_model_dir, annotated, tmp_path / "two", group)
    assert (alone["ready"]["ranks"], ready_two["ranks"], ready_two["sharded"]) == (1, 3, False)
    moved = load_file(alone["folder"] / "one" / "model.safetensors")["model.norm.weight"].float()
    assert not torch.equal(moved, model.model.norm.weight.to(torch.bfloat16).float())  # training did something
    _same_training(alone["summaries"], grouped, tmp_path / "two", alone["folder"] / "one")

    # generation: the ranks share the prompts, rank 0 returns every completion in the prompts' order
    trained = load_model(str(tmp_path / "two"), "cpu", dtype=torch.float32)
    prompts = [rows[0]["prompt_ids"], rows[0]["prompt_ids"][:4], rows[0]["prompt_ids"][2:], [5, 6, 7]]
    reply = two.ask({"op": "generate", "prompts": prompts, "n": 1, "temperature": 0.0, "max_new_tokens": 5,
                     "seed": 0}, "generating")
    alone_greedy = TorchEngine(trained, tokenizer, 8, progress=False).generate(prompts, 1, 0.0, 5)
    assert [g[0][0] for g in reply["completions"]] == [g[0].token_ids for g in alone_greedy]
    assert reply["tokens"] == sum(len(g[0].token_ids) for g in alone_greedy)
    completions = [rows[k]["completion_ids"] for k in range(5)]
    scored = two.ask({"op": "score", "prompts": [rows[0]["prompt_ids"]] * 5, "completions": completions,
                      "temperature": 0.7}, "scoring")["logprobs"]
    expected = score_completions(model, [rows[0]["prompt_ids"]] * 5, completions, 0.7)  # the base model
    for got, want in zip(scored, expected):
        assert got == pytest.approx(want, abs=1e-5)
    # a rank that dies takes the group down; main hears it at its next request, in one line
    import signal

    from grpo.errors import TrainerError

    node1_ranks = [int(d.name) for d in Path("/proc").glob("[0-9]*") if _parent(d) == node1.pid]
    assert len(node1_ranks) == 2
    os.kill(node1_ranks[0], signal.SIGKILL)
    assert node1.wait(timeout=60) != 0
    with pytest.raises(TrainerError, match="the trainer process died"):
        two.ask({"op": "generate", "prompts": prompts, "n": 1, "temperature": 0.0, "max_new_tokens": 5, "seed": 0},
                "generating")
    assert not two.alive


def _parent(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def test_a_rank_on_another_machine_exits_when_main_machines_store_goes():
    """Under NCCL a rank waiting for rank 0 may not notice that main's machine died: it watches torchrun's store
    there (a real TCPStore in a process of its own, which counts the pings, killed as main's machine would be)."""
    server = subprocess.Popen([sys.executable, "-c", "import time, torch.distributed as d\n"
                               "s = d.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)\n"
                               "print(s.port, flush=True)\n"
                               "while True: print(s.add('grpo-heartbeat', 0), flush=True); time.sleep(0.05)"],
                              stdout=subprocess.PIPE, text=True)
    port = server.stdout.readline().strip()
    watcher = subprocess.Popen([sys.executable, "-c", "import time; from grpo.group import exit_without_main_machine\n"
                                "exit_without_main_machine(every=0.2); time.sleep(600)"], stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                               "PYTHONPATH": str(ROOT)})
    while int(server.stdout.readline()) < 3:  # the watcher has started and pinged three times
        assert watcher.poll() is None  # and stays while the store answers
    server.kill()
    server.wait()
    _, said = watcher.communicate(timeout=60)
    assert watcher.returncode == 1 and "main's machine stopped answering" in said


def test_more_ranks_than_gpus_is_one_line():
    from grpo.errors import ConfigError
    from grpo.group import check_ranks

    check_ranks(2, "cpu", 0)  # CPU ranks are processes: any number
    check_ranks(4, "cuda", 4)
    with pytest.raises(ConfigError, match="ranks=2 but 1 GPU"):
        check_ranks(2, "cuda", 1)
    check_ranks(2, "cuda", 4, engines=2)
    with pytest.raises(ConfigError, match="engine_ranks=2 and ranks=3 need 5 GPUs but 4 are visible"):
        check_ranks(3, "cuda", 4, engines=2)


def test_a_trainer_process_that_ctrl_c_killed_while_starting_is_an_interrupt_not_a_failure():
    """Ctrl-C reaches the whole foreground group; a trainer still starting (before it ignores SIGINT) dies of it.
    Main must then end the run as interrupted (KILLED, with the resume line), not report a broken trainer."""
    from grpo.errors import TrainerError

    # with SIGINT's default action (a shell's background job inherits it ignored)
    dies_of_sigint = ("import os, signal; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "os.kill(os.getpid(), signal.SIGINT)")
    for code, expected in ((dies_of_sigint, KeyboardInterrupt),
                           ("raise SystemExit(3)", TrainerError)):
        client = TrainerClient(timeout=5)
        client.process = subprocess.Popen([sys.executable, "-c", code])
        with pytest.raises(expected):
            client._died("finetune")
        assert client.process is None


def test_trainer_gpu_placement_on_a_machine_without_that_gpu_is_one_line():
    """The trainer's own card is checked where the placement is made: on this CPU machine (no GPUs) any
    trainer_gpu is refused with the fix, and the default shares one device."""
    from grpo.config import Config
    from grpo.errors import ConfigError
    from grpo.workspace import Placement, place

    cfg = Config().replace(device="cpu", trainer_gpu=1)
    with pytest.raises(ConfigError, match="trainer_gpu=1 needs GPUs, but this run is on the CPU"):
        place(cfg.policy, cfg.engine, cfg.group.trainer_gpu)
    assert place(cfg.policy, cfg.engine) == Placement("cpu", "cpu", "cpu")


def test_one_gpu_is_shared_by_fractions_that_a_smaller_card_scales_down(monkeypatch):
    """Main gets gpu_memory_utilization of the card, the trainer the rest less a 5% margin (at least 5%); sized
    for a smaller card (GRPO_GPU_MEMORY_GIB), both shrink by the cards' ratio, and a larger one changes nothing;
    a size that is not a positive number is refused in one line."""
    from grpo.config import Config
    from grpo.errors import ConfigError
    from grpo.workspace import check_placement, planned_card_gib, shared_card

    for bad in ("80GB", "0", "-4"):
        monkeypatch.setenv("GRPO_GPU_MEMORY_GIB", bad)
        with pytest.raises(ConfigError, match="give the card size to plan for in GiB"):
            planned_card_gib()
        with pytest.raises(ConfigError, match="give the card size to plan for in GiB"):
            check_placement(Config().replace(device="cpu"))  # before a run starts, though the CPU has no cap
    monkeypatch.setenv("GRPO_GPU_MEMORY_GIB", "79.6")
    assert planned_card_gib() == 79.6

    assert shared_card(0.35) == pytest.approx((0.35, 0.60))
    assert shared_card(0.35, (80.0, 160.0)) == pytest.approx((0.175, 0.30))
    assert shared_card(0.35, (200.0, 80.0)) == pytest.approx((0.35, 0.60))
    assert shared_card(0.97) == pytest.approx((0.97, 0.05))
    assert sum(shared_card(0.5, (79.6, 139.8))) * 139.8 <= 79.6 * 0.95 + 1e-9  # both together fit the small card


def test_a_finetune_sent_to_the_trainer_process_runs_while_main_does_something_else(tiny_model_dir, tokenizer,
                                                                                     tmp_path):
    """max_lag rests on this: `train` sends the request at once and the trainer process works through it on its
    own; its step lines wait, in order, until main collects them."""
    from conftest import wait_until

    annotated = tmp_path / "annotated.jsonl"
    write_jsonl(_rows(tokenizer, load_model(tiny_model_dir, "cpu", dtype=torch.float32)), annotated)
    client = TrainerClient(timeout=120)
    client.start(tiny_model_dir, Optim(warmup_steps=0, train_batch_size=2, gradient_accumulation_passes=1), "cpu", "")
    try:
        steps = client.train(annotated, 0, 0, 10)  # nothing read from it yet
        wait_until(lambda: client.lines.qsize() == 5, "the trainer to finish iteration 0 unread", 120)  # 4 steps
        seen = []
        summary = drain(steps, lambda event: seen.append(event["step"]))
        assert seen == [1, 2, 3, 4] and summary["optimizer_steps"] == 4  # the run's optimiser steps, from 1
    finally:
        client.close()


@pytest.mark.slow
def test_a_sharded_group_trains_checkpoints_resumes_as_one_process_and_feeds_engine_ranks(
        alone, tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """shard=true (FSDP2), two CPU ranks: the same steps as one process, a checkpoint in the one-process format
    (whole weights, AdamW state keyed alike), and a resume from the one process's checkpoint that trains the
    third iteration to the same weights (so a run can switch between sharded and not). Resumed beside two engine
    ranks (grpo.engine_ranks): its rank 0 broadcasts the weights the ranks gather, before and after training, and
    the engines then serve them (probe, greedy generation) and score as the base model."""
    monkeypatch.setenv("GRPO_CPU_BF16", "0")
    annotated, group = alone["folder"] / "annotated.jsonl", Group(ranks=2, shard=True)
    two, ready, grouped = _train(tiny_model_dir, annotated, tmp_path / "two", group)
    assert (ready["ranks"], ready["sharded"]) == (2, True)
    _same_training(alone["summaries"], grouped, tmp_path / "two", alone["folder"] / "one")
    # each rank serves a whole copy of the sharded weights: greedy completions as one engine's on the exported ones
    prompts = [alone["rows"][0]["prompt_ids"], [5, 6, 7]]
    reply = two.ask({"op": "generate", "prompts": prompts, "n": 1, "temperature": 0.0, "max_new_tokens": 5,
                     "seed": 0}, "generating")
    trained = load_model(str(tmp_path / "two"), "cpu", dtype=torch.float32)
    greedy = TorchEngine(trained, tokenizer, 8, progress=False).generate(prompts, 1, 0.0, 5)
    assert [g[0][0] for g in reply["completions"]] == [g[0].token_ids for g in greedy]
    two.save(checkpoint_path(tmp_path, 1))
    two.wait_saved()
    two.close()
    ours, theirs = (torch.load(checkpoint_path(side, 1) / "optimizer.pt")["optimizer"]
                    for side in (tmp_path, alone["folder"]))
    assert [g["params"] for g in ours["param_groups"]] == [g["params"] for g in theirs["param_groups"]]
    assert ours["state"].keys() == theirs["state"].keys()
    for k, state in theirs["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours["state"][k][name], state[name], rtol=1e-3, atol=1e-6)
        assert float(ours["state"][k]["step"]) == float(state["step"]) == 4  # two iterations of two steps
    weights = [load_file(checkpoint_path(side, 1) / "model.safetensors") for side in (tmp_path, alone["folder"])]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[1]:
        assert weights[0][name].dtype == torch.float32
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=2e-2)

    # resumed from the one process's checkpoint, beside two engine ranks that the trainer's rank 0 broadcasts to
    cfg = Config.from_flat({"model": tiny_model_dir, "ranks": 2, "shard": True, "engine_ranks": 2,
                            "generation_batch_size": 8, "trainer_timeout": 120})
    rows, placement = alone["rows"], place(cfg.policy, cfg.engine)
    probe = Probe(rows[0]["prompt_ids"], rows[0]["completion_ids"])
    engines = EngineRanks(cfg)
    engines.start(placement, probe)
    resumed = TrainerClient(timeout=120)
    start = resumed.start(tiny_model_dir, OPTIM, "cpu", str(checkpoint_path(alone["folder"], 1)), probe=probe,
                          group=group, batch_size=8, **engines.trainer_placement(placement))["ready"]
    assert (start["global_step"], start["iteration"]) == (4, 0)
    served = lambda: engines.client.ask({"op": "engine_probe"}, "probe")["probe"]  # noqa: E731 (engine rank 0)
    engines.send(resumed, 2, fresh=True)
    before = served()
    assert before == pytest.approx(resumed.probe()[0], abs=1e-5)  # float32 on both sides: the same weights
    drain(resumed.train(annotated, 2, 0, 10))
    resumed.export(tmp_path / "three")
    _same_training([], [], tmp_path / "three", alone["folder"] / "one3")
    engines.send(resumed, 3)
    after = served()
    assert after == pytest.approx(resumed.probe()[0], abs=1e-5) and after != pytest.approx(before, abs=1e-3)
    # both engines hold them: greedy completions, shared out and gathered in order, as one engine's on the float32
    # weights the trainer checkpoints (the bf16 export would round them)
    prompts = [rows[0]["prompt_ids"], [5, 6, 7], rows[0]["prompt_ids"][2:]]
    reply = engines.client.ask({"op": "generate", "prompts": prompts, "n": 1, "temperature": 0.0,
                                "max_new_tokens": 5, "seed": 0}, "generating")
    resumed.save(checkpoint_path(tmp_path, 2))
    resumed.wait_saved()
    one = TorchEngine(load_model(tiny_model_dir, "cpu", dtype=torch.float32), tokenizer, 8, progress=False)
    one.update_weights(load_file(checkpoint_path(tmp_path, 2) / "model.safetensors").items(), 3)
    greedy = one.generate(prompts, 1, 0.0, 5)
    assert [g[0][0] for g in reply["completions"]] == [g[0].token_ids for g in greedy]
    completions = [rows[k]["completion_ids"] for k in range(3)]  # the reference model is the base model
    scored = engines.client.ask({"op": "score", "prompts": [rows[0]["prompt_ids"]] * 3, "completions": completions,
                                 "temperature": 0.7}, "scoring")["logprobs"]
    for got, want in zip(scored, score_completions(alone["model"], [rows[0]["prompt_ids"]] * 3, completions, 0.7)):
        assert got == pytest.approx(want, abs=1e-5)
    # an engine rank that dies takes the engines' group down; main hears it at its next request, in one line
    import signal

    from grpo.errors import TrainerError

    agent = engines.client.process.pid
    ranks = [int(d.name) for d in Path("/proc").glob("[0-9]*") if _parent(d) == agent]
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    with pytest.raises(TrainerError, match="probe: the engine ranks died"):
        engines.client.ask({"op": "engine_probe"}, "probe")
    assert not engines.alive and resumed.alive
    resumed.close()


# micro-batches (token ids) per step and rank: rank 0 two and rank 1 one, then rank 1 none (it sends zeros)
GRADIENT_PLAN = {0: [[[1, 2, 3], [4, 5]], [[0, 1]]], 1: [[[5, 5, 2, 0]], []]}


def _tied_model(dtype):
    """Embedding, a layer and an output tied to the embedding (as a Llama's lm_head), same weights every call."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(6, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 6, bias=False))
    model[2].weight = model[0].weight
    return model.to(dtype)


def _micro_batch_loss(model, ids):
    logits = model(torch.tensor(ids)).float()
    return (logits * torch.linspace(-1.0, 1.0, logits.numel()).view_as(logits)).sum()


def _gradient_sum_rank(out: str) -> None:
    """One rank (under torchrun) of the test below: a step's micro-batches as the trainer runs them, with buckets
    of 10 elements (several), for a float32 model and for a bf16 copy beside float32 masters."""
    import copy

    import torch.distributed as dist

    from grpo.group import GradientSum
    from grpo.trainer import grads_to_master

    dist.init_process_group("gloo")
    rank, results = dist.get_rank(), {}
    for dtype in (torch.float32, torch.bfloat16):
        master = _tied_model(torch.float32)
        compute = master if dtype == torch.float32 else copy.deepcopy(master).to(dtype)
        pairs = list(zip(master.parameters(), compute.parameters()))
        summed = GradientSum(pairs, bucket_elements=10)
        for step, batches in enumerate(GRADIENT_PLAN[rank]):
            summed.begin_step()
            for index, ids in enumerate(batches):
                if index == len(batches) - 1:
                    summed.arm()
                _micro_batch_loss(compute, ids).backward()
                grads_to_master(pairs)  # as the trainer does after each backward
            started_in_backward = summed.started
            summed.finish()
            results[(str(dtype), step)] = ([m.grad.clone() for m in master.parameters()], started_in_backward,
                                           len(summed.layout))
            for m in master.parameters():
                m.grad = None  # as the optimiser's zero_grad
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_gradient_sums_start_during_the_last_backward_and_equal_every_micro_batch_added(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    __file__, str(tmp_path)], env=env, check=True, timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for dtype in (torch.float32, torch.bfloat16):
        compute = _tied_model(dtype)
        for step in range(2):
            expected = [torch.zeros(p.shape) for p in compute.parameters()]
            for rank in range(2):
                for ids in GRADIENT_PLAN[rank][step]:  # each micro-batch's gradient, added in float32
                    grads = torch.autograd.grad(_micro_batch_loss(compute, ids), list(compute.parameters()))
                    expected = [e + g.float() for e, g in zip(expected, grads)]
            for rank, results in enumerate(ranks):
                grads, started, buckets = results[(str(dtype), step)]
                assert buckets == 3  # the layer's bias (4 elements), its weight (16), the embedding (24)
                for got, want in zip(grads, expected):
                    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
                # every bucket went out from the hooks of the last backward; a rank without rows sent at finish
                assert started == (buckets if GRADIENT_PLAN[rank][step] else 0)


if __name__ == "__main__":
    _gradient_sum_rank(sys.argv[1])


def test_ranks_are_dealt_rows_in_snake_order_so_sorted_lengths_balance():
    """`share` deals a list sorted by length 0,1,1,0,0,1,...: two ranks get equal totals of 1..8 (round-robin would
    give 16 and 20); `unshare` puts every rank's part back in order, for any number of ranks and items."""
    from grpo.group import share, unshare

    assert [share(list(range(1, 9)), r, 2) for r in range(2)] == [[1, 4, 5, 8], [2, 3, 6, 7]]
    assert [share(list(range(7)), r, 3) for r in range(3)] == [[0, 5, 6], [1, 4], [2, 3]]
    for size in (1, 2, 3, 4):
        for n in (0, 1, 5, 8, 13):
            items = [f"row-{k}" for k in range(n)]
            parts = [share(items, r, size) for r in range(size)]
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            assert unshare(parts) == items
