"""Rollout engines: G completions per prompt with the logprob of every sampled token.

Two engines implement `RolloutEngine`; the trainer knows nothing else:
- `VLLMEngine` (vllm_engine.py): vLLM in the trainer's own process, sleep mode on CUDA,
  weights swapped in place after every update.
- `TorchEngine` (torch_engine.py): batched sampling over the HF model with a KV cache;
  used where vLLM is absent and as the reference vLLM's logprobs are held to.

Logprobs are those of the temperature-scaled distribution (after top-p, which renormalises
over the nucleus), i.e. the distribution the trainer scores when top_p = 1.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from rptfast.errors import ConfigError, FileFormatError, PathError, looks_like_path


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy (logprobs then of the untempered distribution)
    top_p: float = 1.0
    max_tokens: int = 64


@dataclass
class Completion:
    prompt_index: int  # index into the prompts of the generate call
    sample_index: int  # 0..n-1 within the prompt's group
    token_ids: list[int]  # sampled tokens, EOS included when it was sampled
    logprobs: list[float]  # logprob of each sampled token under the tempered distribution
    finish_reason: str  # "stop" (EOS) or "length" (max_tokens or max_model_len)


def sample_seed(*parts) -> int:
    """Seed of a prompt's group: a pure function of its parts, e.g. (run seed, step, global prompt index).

    62 bits, so that seed + j (sample j of the group, vLLM's convention) cannot overflow.
    """
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> list[Completion]:
        """n completions per prompt, ordered by (prompt_index, sample_index).

        seeds[i] seeds prompt i; sample j uses seeds[i] + j (vLLM's convention for n > 1),
        so that what is sampled for a prompt does not depend on its batch neighbours.
        """

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...
    def update_adapter(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int: ...  # LoRA runs
    def sleep(self) -> None: ...
    def wake(self) -> None: ...


def is_hub_name(path: str) -> bool:
    """`org/name` that is not a path on this machine: transformers would look it up on the hub."""
    return not (looks_like_path(path) or Path(path).exists() or path.count("/") != 1)


def check_model_dir(path: str, max_model_len: int | None = None, key: str = "model.path") -> int | None:
    """Before any work: `path` names a model that can be loaded, or a clear one-line error naming `key`.
    Returns the model's position limit (None when its config has none).

    A local path must be a directory with a readable config.json and safetensors files whose
    headers match their sizes (a truncated download fails here, not inside vLLM) and whose
    tensor shapes are the ones config.json implies (`check_shapes`). A hub name must be in the
    HF cache, or the hub reachable: an offline machine fails at once rather than after a minute
    of retries. `max_model_len` (rollout.max_model_len) must fit the model's
    max_position_embeddings. Weights are not hashed: a bit flip inside a tensor is not caught.
    """
    p = Path(path)
    if not is_hub_name(path):
        if not p.exists():
            raise PathError(f"{key} {path!r} does not exist; give a HF model directory (config.json + weights + "
                            f"tokenizer) or a hub name (org/name)")
        if not p.is_dir():
            raise PathError(f"{key} {path!r} is a file, not a HF model directory; give the directory that holds "
                            f"config.json")
        if not (p / "config.json").is_file() and (p / "adapter_config.json").is_file():
            raise PathError(f"{key} {path!r} is a LoRA adapter folder (peft), not a model: give the merged model "
                            f"(final/merged, written with model.lora_merged = true) or its base model")
        if not (p / "config.json").is_file():
            raise PathError(f"{key} {path!r} is not a HF model directory: it has no config.json")
        config_json = p / "config.json"
        for f in sorted(p.glob("*.safetensors")):
            _check_safetensors(f)
        if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
            raise PathError(f"{key} {path!r} holds no weights (*.safetensors); copy them in or give another model")
    else:
        config_json = _hub_config(path, key)
    limit = _max_positions(config_json)
    if not is_hub_name(path):
        check_shapes(p, key)
    if max_model_len is not None and limit is not None and max_model_len > limit:
        raise ConfigError(f"rollout.max_model_len ({max_model_len}) exceeds the max_position_embeddings "
                          f"({limit}) of {key} {path!r}; lower it to at most {limit}")
    return limit


def _check_safetensors(f: Path) -> dict:
    """The 8-byte header length, the JSON header and the file size agree (the format is that simple).
    Returns the header: {tensor name: {"dtype", "shape", "data_offsets"}} (and "__metadata__")."""
    size = f.stat().st_size
    try:
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except OSError as e:
        raise PathError(f"model file {str(f)!r} cannot be read ({e.strerror}); check its permissions") from None
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise FileFormatError(f"model file {str(f)!r} is not a valid safetensors file ({e}); "
                              f"download or save the model again") from None
    if 8 + n + end != size:
        raise FileFormatError(f"model file {str(f)!r} is truncated or padded: {size} bytes, its header says "
                              f"{8 + n + end}; download or save the model again")
    return header


def check_shapes(path: Path, key: str = "model.path") -> None:
    """The safetensors tensors have the shapes config.json implies, or a one-line error naming the folder.

    The expected shapes come from the model built on the meta device (no memory, no weights
    read); the actual ones from the safetensors headers. A tensor is compared when its name is a
    state-dict name of the model, with or without the base model's prefix ("model."), which is
    how transformers matches them. Not checked: tensors under other names (checkpoints that
    transformers renames or fuses at load), config.json with a quantization_config (packed
    weights have other shapes by design) and architectures that need trust_remote_code
    (building them runs the repository's code); transformers' own load reports those.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))  # valid JSON: _max_positions read it
    if raw.get("model_type") not in CONFIG_MAPPING or raw.get("quantization_config"):
        return
    try:
        hf_config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, TypeError, KeyError) as e:
        raise FileFormatError(f"{key} {str(path)!r}: transformers cannot build a model from its config.json "
                              f"({type(e).__name__}: {e}); fix or replace config.json") from None
    prefix = f"{model.base_model_prefix}."
    expected = {}
    for name, t in model.state_dict().items():
        expected[name] = list(t.shape)
        expected.setdefault(name.removeprefix(prefix), list(t.shape))
    wrong = []
    for f in sorted(path.glob("*.safetensors")):
        for name, info in _check_safetensors(f).items():
            if name in expected and list(info["shape"]) != expected[name]:
                wrong.append(f"{name} is {info['shape']} in {f.name}, the config implies {expected[name]}")
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise FileFormatError(f"{key} {str(path)!r}: its weights do not match its config.json: {'; '.join(wrong[:3])}"
                              f"{more}; give the config.json the weights were saved with, or the weights for this "
                              f"config")


def _hub_config(name: str, key: str) -> Path:
    """config.json of a hub model from the cache, or downloaded when the hub answers at once."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub as hub

    try:
        cached = hub.try_to_load_from_cache(name, "config.json")
    except ValueError as e:  # HFValidationError: not a repo id
        raise PathError(f"{key} {name!r} is neither a local directory nor a hub name ({e}); give one") from None
    if isinstance(cached, str):
        return Path(cached)
    if hub.constants.HF_HUB_OFFLINE:
        raise PathError(f"{key} {name!r} is not a local directory and not in the HF cache, and HF_HUB_OFFLINE is "
                        f"set; download it first (huggingface-cli download {name}) or give a local directory")
    host = urlparse(hub.constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=10).close()
    except OSError as e:
        raise PathError(f"{key} {name!r} is not a local directory and not in the HF cache, and {host} cannot be "
                        f"reached ({e}); give a local directory, or connect and retry") from None
    try:
        return Path(hub.hf_hub_download(name, "config.json"))
    except (OSError, ValueError) as e:
        raise PathError(f"{key} {name!r}: no such model on the hub, or it is gated ({type(e).__name__}); "
                        f"check the name or give a local directory") from None


def _max_positions(config_json: Path) -> int | None:
    """max_position_embeddings (or a sibling name) of the model, or of its text model."""
    try:
        cfg = json.loads(config_json.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{str(config_json)!r} is not valid JSON ({e}); fix or replace it") from None
    if not isinstance(cfg, dict):
        raise FileFormatError(f"{str(config_json)!r} is not a JSON object; fix or replace it")
    cfg = cfg.get("text_config") or cfg
    return next((v for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
                 if isinstance(v := cfg.get(k), int)), None)


def check_prompts(prompts: list[list[int]], max_model_len: int) -> None:
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(p) >= max_model_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens, at or over the engine's max length "
                             f"{max_model_len} (rollout.max_model_len); raise it or shorten the prompt "
                             f"(data.max_prompt_tokens)")


def buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
            device: torch.device, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Move tensors to the engine's device/dtype a bucket at a time and yield them.

    Only one bucket (at most bucket_bytes, or one tensor if it is larger) is resident
    beyond the source at any moment; the source iterator may itself gather lazily
    (e.g. FSDP full tensors), so the whole model never exists twice.
    """
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named_tensors:
        bucket.append((name, t))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            yield from _move(bucket, device, dtype)
            bucket, size = [], 0
    yield from _move(bucket, device, dtype)


def _move(bucket, device, dtype):
    moved = [(n, t.detach().to(device=device, dtype=dtype or t.dtype, non_blocking=True)) for n, t in bucket]
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    yield from moved


class SyncNames:
    """What makes a weight sync complete: every parameter name of the engine's model, each sent once.

    Names stream through `check` (an unknown name raises at once, before the engine sees it);
    `done` then raises if a parameter was never sent, since the engine would keep serving its
    old value. A tied weight (lm_head sharing the embedding) is one parameter under one name,
    as in the HF model's `named_parameters()`, which is what the trainer sends.
    """

    def __init__(self, expected: set[str]):
        self.expected = expected
        self.sent: set[str] = set()

    def check(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in named_tensors:
            if name not in self.expected:
                raise KeyError(f"update_weights: {name!r} is not a parameter of the engine's model "
                               f"(it has e.g. {sorted(self.expected)[:3]}); send the HF model's named_parameters()")
            if name in self.sent:
                raise ValueError(f"update_weights: {name!r} was sent twice in one sync")
            self.sent.add(name)
            yield name, t

    def done(self) -> None:
        missing = self.expected - self.sent
        if missing:
            raise ValueError(f"update_weights must send every parameter of the engine's model: {len(missing)} of "
                             f"{len(self.expected)} were not sent ({', '.join(sorted(missing)[:5])}), and the engine "
                             f"would serve stale values for them")


def hf_parameter_names(model_path: str, trust_remote_code: bool = False) -> set[str]:
    """Parameter names of the HF model at `model_path` (built on the meta device: no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    return {name for name, _ in model.named_parameters()}


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_engine(kind: str, model_path: str, *, dtype: torch.dtype, device: torch.device, seed: int,
                max_model_len: int, gpu_memory_utilization: float = 0.4, cpu_kv_cache_gib: int = 1,
                sleep_level: int = 1, sync_bucket_mb: int = 256, enforce_eager: bool = False,
                trust_remote_code: bool = False, lora: dict | None = None) -> RolloutEngine:
    """Build the engine named by rollout.engine ("auto": vLLM when importable, else torch); with `lora`
    (model.lora.engine_config) it serves that LoRA adapter."""
    check_model_dir(model_path, max_model_len)
    if kind == "auto":
        kind = "vllm" if vllm_available() else "torch"
    if kind == "vllm":
        if not vllm_available():
            raise ConfigError("rollout.engine = 'vllm' but vllm is not installed; "
                               "pip install 'rptfast[gpu]' (or [cpu]) or set rollout.engine = 'torch'")
        from rptfast.rollout.vllm_engine import VLLMEngine
        return VLLMEngine(model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                          gpu_memory_utilization=gpu_memory_utilization, cpu_kv_cache_gib=cpu_kv_cache_gib,
                          sleep_level=sleep_level, bucket_bytes=sync_bucket_mb << 20,
                          enforce_eager=enforce_eager, trust_remote_code=trust_remote_code, lora=lora)
    from rptfast.rollout.torch_engine import TorchEngine
    return TorchEngine(model_path, dtype=dtype, device=device, max_model_len=max_model_len,
                       sleep_level=sleep_level, bucket_bytes=sync_bucket_mb << 20,
                       trust_remote_code=trust_remote_code, lora=lora)
