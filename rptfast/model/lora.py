"""LoRA through peft: adapters injected into the policy, the base frozen and shared, adapter-only state.

With model.lora_rank = r > 0, every linear layer named in model.lora_targets gets peft's LoRA branch,
W x + (alpha / r) B A x, with A [r, in] and B [out, r] (B starts at 0, so step 0 is the base model). Only
A and B train: they and their AdamW moments are in train.master_dtype (fp32), the frozen base in the
compute dtype (model.dtype), which is also the dtype the engine holds it in. That is what lets the
trainer's base be the engine's tensors (share_base): one copy of the base in the process, not two.

Names: inside the model a layer's weights are `X.base_layer.weight` (the frozen W, `X.weight` in the
HF checkpoint) and `X.lora_A.default.weight`, `X.lora_B.default.weight`; an adapter file (peft's
`save_pretrained`, which vLLM and `PeftModel.from_pretrained` read) names them
`base_model.model.X.lora_A.weight`. The sync and the export use the file's names.

Left out: DoRA, rsLoRA, per-module ranks and adapters on the embedding or lm_head (vLLM serves none of
them the way peft trains them, or at all); LoRA biases; QLoRA (a quantised base is another layout than
the engine's, so it could not be shared).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from rptfast.errors import ConfigError

ADAPTER = "default"  # peft's adapter name inside the model
ADAPTER_CONFIG = "adapter_config.json"  # peft's adapter folder: this and adapter_model.safetensors
PREFIX = "base_model.model."  # what peft's adapter files put before a module name
LINEAR_TARGETS = "all-linear"  # peft's own: every linear layer but the output layer


def target_modules(model_cfg) -> list[str] | str:
    """model.lora_targets as peft takes it: a list of module names, or "all-linear"."""
    names = [t.strip() for t in model_cfg.lora_targets.split(",") if t.strip()]
    return LINEAR_TARGETS if names == [LINEAR_TARGETS] else names


def add_adapters(lm: nn.Module, model_cfg, adapter_dtype: torch.dtype) -> nn.Module:
    """Inject peft's LoRA into `lm` in place (the HF model stays the same object, so its base_model, layers
    and lm_head are where the trainer looks for them); adapters in `adapter_dtype`, everything else frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=model_cfg.lora_rank, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
                        target_modules=target_modules(model_cfg), bias="none")
    try:
        inject_adapter_in_model(config, lm, adapter_name=ADAPTER)
    except ValueError as e:  # peft's NoMatchingPeftModuleError is one
        layers = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"model.lora_targets = {model_cfg.lora_targets!r}: {str(e).splitlines()[0]} The model's "
                          f"linear layers are named {', '.join(layers)} (or give {LINEAR_TARGETS!r})") from None
    for name, p in lm.named_parameters():
        if is_adapter(name):
            p.data = p.data.to(adapter_dtype)
        p.requires_grad_(is_adapter(name))
    return lm


def check_targets(path: str, model_cfg, trust_remote_code: bool) -> None:
    """model.lora_targets names layers of the model at `path` (peft injects into the model built on the meta
    device: no memory, no weights read), or a ConfigError before any engine starts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code),
                                              trust_remote_code=trust_remote_code)
    add_adapters(lm, model_cfg, torch.float32)


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def is_lora(module: nn.Module) -> bool:
    return any(is_adapter(n) for n, _ in module.named_parameters())


def adapter_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name in the module, parameter) of every adapter matrix, in a fixed order (every rank the same)."""
    return [(n, p) for n, p in module.named_parameters() if is_adapter(n)]


def base_name(name: str) -> str:
    """A frozen parameter's name in the HF checkpoint (and the engine): `.base_layer` dropped."""
    return name.replace(".base_layer.", ".")


def file_name(name: str, prefix: str = "") -> str:
    """`X.lora_A.default.weight` (name inside `prefix` + the module) -> `base_model.model.X.lora_A.weight`."""
    return PREFIX + prefix + name.replace(f".{ADAPTER}.", ".")


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a collective: every rank calls it, in the same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def adapter_tensors(module: nn.Module, dtype: torch.dtype | None = None,
                    prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(file name, full tensor) of each adapter matrix, cast to `dtype` before the gather (the engine's
    dtype: the engine's copy of the adapter), one at a time; what the sync sends and the export writes."""
    for name, p in adapter_params(module):
        yield file_name(name, prefix), _full(p.detach() if dtype is None else p.detach().to(dtype))


@torch.no_grad()
def copy_adapters(dst: nn.Module, src: nn.Module) -> None:
    """dst's adapters <- src's (the same layers, sharded alike: local shards are copied). peft draws A at random
    when it injects, so a second LoRA model (the EMA baseline) starts as the policy only once copied."""
    local = lambda t: t._local_tensor if hasattr(t, "_local_tensor") else t  # noqa: E731
    for (name, d), (other, s) in zip(adapter_params(dst), adapter_params(src), strict=True):
        assert name == other, (name, other)
        local(d).copy_(local(s))


def adapter_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """{name in the module: full CPU copy} of the adapters: all a LoRA checkpoint holds of the weights (the
    base is model.path's, unchanged). For the policy this is its trainable state; for the EMA baseline
    (data.reward = "info_gain") its averaged adapters."""
    return {name: _full(p.detach()).cpu().clone() for name, p in adapter_params(module)}


def share_base(lm: nn.Module, lookup: Callable[[str], torch.Tensor | None]) -> tuple[int, int]:
    """Point each frozen parameter of `lm` at the tensor `lookup(its HF name)` gives (the engine's weight,
    a row slice of a fused one, or another model's base), where that tensor holds the very same values:
    same dtype and shape (a vocabulary padded to a multiple of 64 is cut back to the model's) and equal bit
    for bit; `lm`'s parameter then lives on that tensor's device, and the copy it loaded is freed. Returns
    (bytes shared, bytes of frozen weights); what could not be shared keeps its own copy, so the result is
    right either way, only larger.

    The shared tensors are frozen on both sides: nothing here may write them (update_weights on an engine
    that lent its base would change the trainer's too, which is why a LoRA run syncs adapters only).
    """
    shared = total = 0
    for name, p in lm.named_parameters():
        if p.requires_grad:
            continue
        total += p.numel() * p.element_size()
        t = lookup(base_name(name))
        if t is None or t.dtype != p.dtype or t.dim() != p.dim():
            continue
        if t.shape != p.shape and t.shape[1:] == p.shape[1:] and t.shape[0] > p.shape[0]:
            t = t[: p.shape[0]]  # an engine's embedding or lm_head padded past the vocabulary
        if t.shape != p.shape:
            continue
        # the loaded copy may still be on the host (loaded there, moved to the device after this): compared one
        # tensor at a time, so the device never holds the trainer's copy of the base
        if t.data_ptr() == p.data_ptr() or torch.equal(t, p.detach().to(t.device)):
            p.data = t
            shared += p.numel() * p.element_size()
    return shared, total


def engine_config(model_cfg) -> dict:
    """What an engine needs to serve the adapter (adapter_config.json's fields): rank, alpha, target modules."""
    return {"r": model_cfg.lora_rank, "lora_alpha": model_cfg.lora_alpha, "target_modules": target_modules(model_cfg)}


def adapter_config(lm: nn.Module) -> dict:
    """adapter_config.json of the adapter injected into `lm` (add_adapters), its targets resolved to the layer
    names peft matched, the base named by the directory the model was loaded from."""
    cfg = lm.peft_config[ADAPTER]
    targets = sorted({n.rsplit(".lora_A.", 1)[0].rsplit(".", 1)[-1] for n, _ in adapter_params(lm)})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout, "target_modules": targets, "bias": "none",
            "base_model_name_or_path": lm.config._name_or_path, "inference_mode": True}


def write_adapter(out: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """peft's adapter folder in `out`: adapter_model.safetensors (adapter_tensors' names and values) and
    adapter_config.json (adapter_config): what `PeftModel.from_pretrained(base model, out)` and vLLM's
    LoRARequest load."""
    from safetensors.torch import save_file

    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, out / "adapter_model.safetensors",
              metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))


@torch.no_grad()
def merged_weights(lm: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The HF model's state dict with every adapter merged, W + (alpha / r) B A, computed in fp32 from the full
    (gathered) adapters and cast to `dtype`: a plain HF checkpoint, no peft needed to load it. Every rank calls
    it (the gathers are collectives)."""
    from peft.tuners.lora import LoraLayer

    weights = {base_name(n): t.detach().to(dtype) for n, t in lm.state_dict().items() if not is_adapter(n)}
    for path, module in lm.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            a = _full(module.lora_A[ADAPTER].weight.detach()).float()  # [r, in]
            b = _full(module.lora_B[ADAPTER].weight.detach()).float()  # [out, r]
            w = module.get_base_layer().weight.detach().float()  # [out, in]
            weights[f"{path}.weight"] = (w + module.scaling[ADAPTER] * (b @ a)).to(dtype)
    return weights
