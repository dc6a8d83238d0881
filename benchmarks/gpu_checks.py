"""Checks of the GPU-only code paths, printed as a table (run on a CUDA machine; CI has none):
packed flash-attention (varlen) logprobs and gradients against the padded SDPA layout, the static-cache sampler's
logprobs against the trainer's, its one KV buffer across batch shapes, weights handed to another process by
CUDA IPC, the probe check's precision (trainer vs a bf16 engine on a sharpened SmolLM2-shaped policy), and the
sharded trainer (FSDP2 over a one-rank NCCL group): its step, hand-over probe and checkpoint, resumed sharded and
unsharded (fused AdamW), and its rank 0 sending its weights over the NCCL group engine ranks would join.

    python benchmarks/gpu_checks.py [TOKENIZER_FOLDER]     # default: the bundled SmolLM2's"""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).cuda()


def varlen_vs_padded(rows: list[str]) -> None:
    from grpo.scoring import VARLEN, autocast, pack, sequence_logprobs, use_varlen_attention

    model = tiny_llama(5000)
    g = torch.Generator().manual_seed(1)
    draw = lambda low, high: [torch.randint(3, 5000, (int(n),), generator=g).tolist()  # noqa: E731
                              for n in torch.randint(low, high, (12,), generator=g)]
    prompts, completions = draw(20, 200), draw(5, 120)
    packed = pack(prompts, completions, "cuda")
    results = {}
    for layout in ("padded", "varlen"):
        if layout == "varlen" and not use_varlen_attention(model):
            rows.append("| varlen attention | unavailable in this torch | - |")
            return
        model.zero_grad()
        with autocast("cuda"):
            logp = sequence_logprobs(model, packed, 0.7)
        logp.sum().backward()
        results[layout] = (logp.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone())
        assert model.config._attn_implementation == (VARLEN if layout == "varlen" else "sdpa")
    diff = (results["varlen"][0] - results["padded"][0]).abs()
    grad = (results["varlen"][1] - results["padded"][1]).norm() / results["padded"][1].norm()
    rows.append(f"| varlen vs padded logprobs (bf16 autocast) | max {diff.max():.2e}, mean {diff.mean():.2e} | "
                f"grad rel. diff {grad:.2e} |")


def compiled_layers(rows: list[str]) -> None:
    """The trainer's compute copy and the reference as the chain runs them (bf16, varlen, fused norms) with and
    without compiled layers: logprobs and gradients, and the reference's no-grad pass against the trainer's."""
    import copy

    from grpo.scoring import compile_layers, fuse_norms, pack, sequence_logprobs, use_varlen_attention

    eager = tiny_llama(5000).to(torch.bfloat16)
    use_varlen_attention(eager)
    fuse_norms(eager)
    compiled = copy.deepcopy(eager)
    count = compile_layers(compiled)
    g = torch.Generator().manual_seed(3)
    draw = lambda low, high: [torch.randint(3, 5000, (int(n),), generator=g).tolist()  # noqa: E731
                              for n in torch.randint(low, high, (12,), generator=g)]
    batches = [pack(draw(20, 200), draw(5, 120), "cuda"), pack(draw(20, 100), draw(5, 60), "cuda")]  # two lengths
    out = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        for packed in batches:
            model.zero_grad()
            logp = sequence_logprobs(model, packed, 1.0)
            logp.sum().backward()
            with torch.no_grad():
                reference = sequence_logprobs(model, packed, 1.0)
        out[name] = (logp.detach().float(), model.model.layers[0].mlp.gate_proj.weight.grad.float(), reference.float())
    diff = (out["compiled"][0] - out["eager"][0]).abs()
    grad = (out["compiled"][1] - out["eager"][1]).norm() / out["eager"][1].norm()
    kl0 = (out["compiled"][2] - out["compiled"][0]).abs()
    rows.append(f"| compiled layers ({count}) vs eager (bf16, varlen) | logprobs max {diff.max():.2e}, mean "
                f"{diff.mean():.2e}; grad rel. diff {grad:.2e} | compiled no-grad vs with grad (KL at step 0): max "
                f"{kl0.max():.2e} |")


def sampler_parity(rows: list[str]) -> None:
    from grpo.engines.torch_engine import TorchEngine
    from grpo.model import load_tokenizer, resolve
    from grpo.scoring import score_completions

    if len(sys.argv) > 1:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    else:
        tokenizer = load_tokenizer(resolve("smollm2-135m"))
    model = tiny_llama(len(tokenizer)).to(torch.bfloat16)
    engine = TorchEngine(model, tokenizer, batch_size=64, progress=False)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, len(tokenizer), (int(n),), generator=g).tolist() for n in (30, 70, 130, 90)]
    for n, temperature in ((8, 1.0), (16, 0.7), (1, 0.0)):  # rollouts, then greedy evaluation: other shapes
        out = engine.generate(prompts, n, temperature, 96, seed=0)  # slots 192..288: two attention spans
    flat = [(p, c) for p, group in zip(prompts, out) for c in group]
    trainer = model.float()
    rescored = score_completions(trainer, [p for p, _ in flat], [c.token_ids for _, c in flat], 1.0)
    gaps = torch.tensor([abs(a - b) for (_, c), r in zip(flat, rescored) for a, b in zip(c.logprobs, r)])
    rows.append(f"| static sampler (bf16) vs trainer (fp32 + autocast) | mean {gaps.mean():.3f}, max {gaps.max():.3f}"
                f" | KV buffers allocated: {engine.static.allocations} for 3 shapes; torch.compile: "
                f"{'on' if engine.static.ops.compiled else 'off'} |")


def cuda_ipc(rows: list[str]) -> None:
    """A child process exports a buffer by CUDA IPC (as the trainer does); this one maps it and reads it back."""
    child = r"""
import base64, pickle, sys, torch
from torch.multiprocessing.reductions import reduce_tensor
t = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
print(base64.b64encode(pickle.dumps(reduce_tensor(t))).decode(), flush=True)
sys.stdin.readline()
"""
    process = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    import base64
    import pickle

    rebuild, args = pickle.loads(base64.b64decode(process.stdout.readline()))
    tensor = rebuild(*args)
    ok = bool((tensor == torch.arange(1 << 20, dtype=torch.float32, device="cuda")).all())
    del tensor
    process.stdin.write("\n")
    process.stdin.flush()
    process.wait()
    rows.append(f"| CUDA IPC between processes | {'ok' if ok else 'WRONG VALUES'} | - |")


def probe_precision(rows: list[str]) -> None:
    """The hand-over check compares the engine's probe logprobs with the trainer's: in the engine's precision (weights
    rounded to bf16) and, as before, under autocast (float32 residual stream), on a SmolLM2-shaped random policy
    as loaded and with its weights scaled up (sharper, as long runs make it)."""
    import tempfile

    from grpo.config import Optim
    from grpo.engines.base import Probe, probe_gap
    from grpo.engines.torch_engine import TorchEngine
    from grpo.model import load_model, resolve
    from grpo.trainer import Trainer

    sys.path.insert(0, str(Path(__file__).parent))
    from sweep_scale import build_model

    tokenizer = sys.argv[1] if len(sys.argv) > 1 else resolve("smollm2-135m")
    folder = build_model(Path(tempfile.mkdtemp()) / "smollm2-shape", tokenizer)
    trainer = Trainer(folder, Optim(), "cuda")
    engine = TorchEngine(load_model(folder, "cuda"), trainer.tokenizer, batch_size=8, progress=False)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, len(trainer.tokenizer), (160,), generator=g).tolist()
    probe = Probe(ids[:100], ids[100:])
    for scale in (1.0, 1.5):
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.mul_(scale)
        engine.update_weights(trainer.named_weights(), 1)
        served = engine.probe_logprobs(probe)
        rounded = probe_gap(served, trainer.probe_logprobs(probe))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            autocast = probe_gap(served, trainer.probe_logprobs(probe, torch.float32))
        rows.append(f"| probe gap, bf16 engine vs trainer, weights x{scale:g} more | bf16-rounded {rounded:.4f} nats, "
                    f"autocast {autocast:.4f} | tolerance {engine.tolerance} |")


def sharded_checkpoint(rows: list[str]) -> None:
    """shard=true on a GPU, as a group of one rank: a step against the unsharded trainer's, the hand-over probe
    against a bf16 engine served from its gathered weights, and its checkpoint resumed unsharded (fused AdamW,
    step counters on the GPU) and sharded, each training the next iteration alike."""
    import socket
    import tempfile

    import torch.distributed as dist

    from grpo.config import Optim
    from grpo.engines.base import Probe, probe_gap
    from grpo.engines.torch_engine import TorchEngine
    from grpo.model import load_model, resolve
    from grpo.trainer import Trainer, drain

    sys.path.insert(0, str(Path(__file__).parent))
    from trainer_profile import synthetic_rows

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else resolve("smollm2-135m"))
    folder = Path(tempfile.mkdtemp())
    tiny_llama(len(tokenizer)).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        data = synthetic_rows(32, len(tokenizer))
        optim = Optim(learning_rate=1e-4, warmup_steps=0, train_batch_size=8, gradient_accumulation_passes=2)
        step = lambda trainer, i: drain(trainer.train(data, i, 0, 100))  # noqa: E731
        model = str(folder / "model")
        sharded, plain = Trainer(model, optim, "cuda", shard=True), Trainer(model, optim, "cuda")
        first = [step(t, 0) for t in (sharded, plain)]
        rows.append(f"| sharded step vs unsharded (one rank) | loss {first[0]['last_loss']:.5f} / "
                    f"{first[1]['last_loss']:.5f}, gradient norm {first[0]['last_grad_norm']:.4f} / "
                    f"{first[1]['last_grad_norm']:.4f} | bf16 compute both |")
        probe = Probe(data[0]["prompt_ids"], data[0]["completion_ids"][:40])
        engine = TorchEngine(load_model(model, "cuda"), tokenizer, batch_size=8, progress=False)
        engine.update_weights(sharded.named_weights(), 1)
        gap = probe_gap(engine.probe_logprobs(probe), sharded.probe_with_precision(probe)[0])
        rows.append(f"| sharded hand-over probe vs bf16 engine | {gap:.4f} nats | group tolerance 0.05 |")
        from grpo.engine_ranks import Meeting, Sender  # engine_ranks' weights group: NCCL beside the default group

        meeting = Meeting(0)  # main's store: it must outlive the group's members, as EngineRanks keeps it
        seconds = Sender().send(sharded, meeting.spec())
        rows.append(f"| engine_ranks weights group (NCCL), the sharded trainer's rank 0 alone | sent "
                    f"{len(sharded.weight_layout())} tensors in {seconds:.3f} s | API check: one GPU cannot hold "
                    "two members |")
        sharded.save(folder / "run" / "checkpoints" / "iter-0000", background=False)
        after = step(sharded, 1)
        checkpoint = str(folder / "run" / "checkpoints" / "iter-0000")
        resumed = {"unsharded": Trainer(model, optim, "cuda", checkpoint=checkpoint),
                   "sharded": Trainer(model, optim, "cuda", checkpoint=checkpoint, shard=True)}
        for name, trainer in resumed.items():
            again = step(trainer, 1)
            rows.append(f"| sharded checkpoint resumed {name} | loss {again['last_loss']:.5f} (went on: "
                        f"{after['last_loss']:.5f}), gradient norm {again['last_grad_norm']:.4f} "
                        f"({after['last_grad_norm']:.4f}) | AdamW fused: "
                        f"{trainer.optimizer.param_groups[0]['fused']} |")
    finally:
        dist.destroy_process_group()


def main() -> None:
    try:
        from torch.nn.attention.varlen import varlen_attn

        signature = f"varlen_attn{inspect.signature(varlen_attn)}"[:200]
    except ImportError:
        signature = "no torch.nn.attention.varlen"
    rows = ["| check | result | note |", "|---|---|---|",
            f"| torch {torch.__version__}, {torch.cuda.get_device_name()} | {signature} | - |"]
    for check in (varlen_vs_padded, compiled_layers, sampler_parity, cuda_ipc, probe_precision, sharded_checkpoint):
        try:
            check(rows)
        except Exception as e:  # report and go on: each check is independent
            rows.append(f"| {check.__name__} | FAILED: {type(e).__name__}: {str(e)[:150]} | - |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
