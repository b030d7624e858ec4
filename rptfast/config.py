"""One flat tree of dataclasses: model, data, rollout, algorithm, train, log, prepare, eval.

Loaded from TOML, overridden with `--set section.key=value`, checked (config_check.py: the
allowed values and combinations), and written back whole into the run directory. Unknown keys,
wrong types and impossible values raise `ConfigError`, which names the key and the fix; the CLI
turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from rptfast.config_check import CHOICES as CHOICES
from rptfast.config_check import MAX_INT, MAX_SEED, check
from rptfast.config_check import warnings_for as warnings_for
from rptfast.errors import ConfigError, FileFormatError, PathError


@dataclass
class ModelConfig:
    path: str = ""  # HF directory or hub name of the policy; "" = build from scratch (model.scratch_*)
    dtype: str = "auto"  # compute (and engine) dtype: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    lm_head_fp32: bool = False  # score log-probs with an fp32 lm_head under bf16/fp16 compute (the engine's is not)
    trust_remote_code: bool = False  # run code shipped with a hub model; off unless you trust it
    attn: str = "auto"  # auto | flash (flash-attn) | varlen (torch, CUDA) | sdpa (block-diagonal mask) | per_seq (CPU)
    gradient_checkpointing: bool = False  # recompute decoder layers in backward to save memory
    logprob: str = "fused"  # fused (lm_head + log-softmax tiled, no logits) | logits (+ kernel) | reference (torch)
    fused_loss: bool = True  # logprob = fused, updates_per_batch = 1: the loss's gradient made in the lm_head pass
    grad_filter: bool = False  # fused_loss: zero gradient blocks with softmax < 2^-12 (CCE-style; docs/performance.md)
    scratch_arch: str = "qwen3"  # architecture when training from scratch: qwen3 | llama
    scratch_layers: int = 2  # decoder layers when training from scratch
    scratch_heads: int = 2  # attention heads (head_dim 64) when training from scratch
    scratch_tokenizer: str = "char"  # tokenizer when training from scratch: char | bpe | toy (rptfast.testing)
    lora_rank: int = 0  # 0 = full fine-tuning; r > 0: train LoRA adapters of rank r (peft), base frozen (docs/lora.md)
    lora_alpha: float = 32.0  # LoRA: the adapter's output is scaled by lora_alpha / lora_rank (peft's lora_alpha)
    lora_dropout: float = 0.0  # LoRA: dropout on the adapters' input; > 0 scores another policy than the engine's
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # LoRA'd layers, or all-linear
    lora_share_base: bool = True  # LoRA: the frozen base is the engine's own tensors where layouts allow (CUDA: all)
    lora_merged: bool = False  # LoRA: final/ is peft's adapter folder; also write final/merged/ (a merged HF model)


@dataclass
class DataConfig:
    task: str = "parity"  # parity | rpt | first_token (built-in task with a learnable signal) | toy (rpt-toy-base)
    parity_d: int = 8  # parity: number of input bits
    parity_p_cot: float = 0.25  # parity: probability that a pre-training target is the long chain
    parity_reward: str = "answer"  # parity: answer (last bit before EOS) | chain (whole chain right)
    toy_demos: float = 0.05  # toy: share of pre-training sequences that are reasoning demonstrations
    toy_think: float = 1.0  # toy: share of demonstrations at an answer that work the sum out (the rest answer at once)
    toy_think_from: int = 0  # toy: the pre-training step from which toy_think applies (before it, all are worked)
    samples: str = ""  # rpt: directory written by `rptfast prepare`
    template: str = "v0"  # rpt: prompt template name (rptfast.data.templates)
    max_prompt_tokens: int = 1024  # rpt: context cut from the left to fit this many prompt tokens
    reward: str = "prefix"  # rpt: prefix (the paper's Eq. 3) | first_token | info_gain (RLP: log-prob gain)
    rpt_ntp: str = "text"  # rpt, train.ntp_steps: text (contexts) | answers (box at once) | thoughts (inline warm-up)
    think_open: str = "<think>"  # inline template: the marker that opens a thought in the raw text
    think_close: str = "</think>"  # inline template: the marker that closes it; the text goes on right after
    thought_spans: int = 4  # rpt_ntp = thoughts: thoughts inserted per warm-up window (one at the sample's position)
    thought_hint: float = 0.5  # rpt_ntp = thoughts: share of them holding the next 1-3 true tokens
    thought_sampled: float = 0.0  # rpt_ntp = thoughts: share holding the model's own sampled thought (rest: empty)
    thought_close: bool = True  # rpt_ntp = thoughts: score the close after a thought's content (learn to end one)
    info_gain_tokens: int = 1  # info_gain: ground-truth tokens teacher-forced after the thought (log-probs summed)
    first_token_set: int = 8  # first_token: reward 1 when the completion starts with a token id < this
    prompt_len: int = 8  # first_token: prompt length in tokens


@dataclass
class RolloutConfig:
    engine: str = "auto"  # auto (vllm when importable, else torch) | vllm | torch
    n: int = 8  # completions per prompt (the GRPO group size)
    temperature: float = 1.0  # sampling temperature; the trainer scores the same tempered distribution
    top_p: float = 1.0  # nucleus sampling; < 1 makes rollout and trainer distributions differ
    max_tokens: int = 64  # completion length cap (the thought budget; with a schedule, its value at the first RL step)
    budget_schedule: str = "constant"  # max_tokens over RL steps: constant | linear | cosine (to max_tokens_end)
    max_tokens_end: int = 0  # budget at the last RL step of a linear or cosine schedule (<= max_tokens)
    max_model_len: int = 2048  # prompt + completion limit of the engine
    gpu_memory_utilization: float = 0.4  # vllm on CUDA: share of GPU memory for weights + KV cache
    cpu_kv_cache_gib: int = 1  # vllm on CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE)
    sleep_level: int = 1  # 1 = weights to CPU while asleep; 2 = drop them, re-synced on wake (torch engine only)
    sync_bucket_mb: int = 256  # weight sync: bytes gathered and pushed per bucket
    enforce_eager: bool = False  # vllm: skip CUDA graphs (faster start, slower decode)


@dataclass
class AlgorithmConfig:
    eps_low: float = 0.2  # ratio clip below: 1 - eps_low
    eps_high: float = 0.28  # ratio clip above: 1 + eps_high (DAPO clip-higher)
    dual_clip: float = 0.0  # dual clip constant c > 1 for negative advantages; 0 = off
    kl_coef: float = 0.0  # k3 KL to the initial policy; 0 = off (the RPT paper uses 0)
    tis_cap: float = 0.0  # truncated importance weight cap against rollout logprobs; 0 = off
    aggregation: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    adv_scale: str = "group"  # group: divide by the group's std | none: Dr. GRPO
    adv_eps: float = 1e-6  # added to the group std
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal, refill from next prompts
    dynamic_sampling_tries: int = 3  # at most this many generate calls per step to fill the batch
    dynamic_sampling_from: int = 0  # RL step from which dynamic sampling is on (the RPT paper: 500)
    old_logprobs: str = "recompute"  # recompute (trainer forward before the update) | rollout (engine's)
    updates_per_batch: int = 1  # mini-batch updates per rollout batch (1 = on-policy)
    mismatch_warn: float = 0.05  # log loudly when max |rollout - trainer logprob| exceeds this
    mismatch_stop: float = 0.1  # stop when the mean |rollout - trainer logprob| per token exceeds this (+ -ln top_p)
    ema_decay: float = 0.999  # info_gain: the no-think baseline's weights phi <- decay phi + (1 - decay) theta per step
    length_coef: float = 0.0  # reward -= length_coef per completion token beyond length_target; 0 = off
    length_target: int = 0  # completion tokens free of the length term
    ntp_coef: float = 0.0  # RL + next-token mix (RMT): + ntp_coef x mean NLL of the prompts' context tokens; 0 = off


@dataclass
class TrainConfig:
    ntp_steps: int = 0  # phase 1: next-token pre-training steps on the task's targets (parity); 0 = none
    ntp_sequences: int = 64  # phase 1: sequences per step over all ranks
    ntp_lr: float = 1e-3  # phase 1: peak learning rate
    steps: int = 20  # phase 2: RL steps (one rollout batch each)
    prompts_per_step: int = 8  # prompts per step over all ranks (each gives rollout.n completions)
    micro_batch_tokens: int = 4096  # tokens per forward/backward (padding included when padded)
    packing: str = "packed"  # packed (one row, no padding) | padded ([B, L] with an attention mask)
    share_prompts: bool = True  # packed: each group's prompt once, then its completions (exact; per_seq/sdpa attention)
    lr: float = 1e-5  # peak learning rate (AdamW)
    weight_decay: float = 0.01  # AdamW weight decay
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    warmup_steps: int = 0  # linear warmup steps
    schedule: str = "constant"  # constant | cosine (to 10% of lr) after warmup
    seed: int = 0  # run seed: weights of scratch models, data order, sampling seeds
    out_dir: str = "runs/default"  # run directory (locked while a run uses it)
    max_skipped: int = 3  # stop (exit 3) after this many consecutive updates skipped for non-finite numbers
    ckpt_every: int = 0  # checkpoint every K steps (and at the end); 0 = only at the end
    keep_ckpts: int = 2  # keep the last K checkpoints
    master_dtype: str = "float32"  # weights AdamW updates, and its state: float32 | bfloat16 (small updates vanish)
    final_dtype: str = "model"  # final/ weights: model (config.json's torch_dtype of model.path) | float32
    offload_optimizer: bool = True  # CUDA: optimizer state to pinned CPU memory while the engine runs
    offload_weights: bool = False  # CUDA: trainer weights to pinned CPU memory while the engine runs
    eval_every: int = 0  # evaluate every K steps (task-specific); 0 = only at the start and end
    eval_prompts: int = 64  # prompts per evaluation


@dataclass
class LogConfig:
    progress: bool = True  # progress bar on the console
    tensorboard: bool = True  # write TensorBoard events (needs the tb extra: pip install 'rptfast[tb]')
    every: int = 1  # console line every K steps
    wandb: bool = False  # also log to Weights & Biases (pip install wandb; WANDB_MODE=offline for no network)
    trackio: bool = False  # also log to trackio (pip install trackio; local unless a Space is configured)
    project: str = "rptfast"  # wandb / trackio project name (the run name is train.out_dir's last part)
    verbose: bool = False  # show library start-up output (vLLM, Triton, NUMA binding) instead of hiding it


@dataclass
class PrepareConfig:
    text_field: str = "text"  # JSONL: the field that holds a document's text
    parquet_column: str = "text"  # Parquet files and `datasets` directories: the column that holds the text
    txt_unit: str = "file"  # plain text: file (one document per file) | paragraph (blank-line separated) | line
    min_entropy: float = 0.5  # keep positions whose proxy top-k entropy (nats) is >= this (paper's easy: > 0.5)
    top_k: int = 16  # entropy over the proxy's k most probable next tokens (the paper: 16)
    min_context_tokens: int = 32  # a position needs at least this many document tokens before it
    max_positions_per_doc: int = 16  # keep at most this many positions per document (a seeded random subset); 0 = all
    continuation_tokens: int = 8  # ground-truth tokens stored after each position (multi-token answers)
    context_tokens: int = 4096  # context tokens stored per sample, cut from the left (prompts cut further)
    proxy_batch_tokens: int = 8192  # packed tokens per proxy forward
    proxy_window: int = 2048  # longest proxy sequence; longer documents run in half-overlapping windows
    shard_samples: int = 8192  # samples per Parquet shard (a shard closes at the first batch end past this)
    eval_fraction: float = 0.05  # share of documents held out for evaluation (split = "eval"); the paper holds out 200
    seed: int = 0  # seeds the held-out documents and the position subsets


@dataclass
class EvalConfig:
    split: str = "eval"  # samples `rptfast eval` scores: eval (held-out documents) | train | all
    samples: int = 0  # the first N samples of the split, in store order; 0 = all
    k: int = 8  # completions per sample: Pass@k, and Random@1 averaged over them (the paper reports Pass@8)
    plain: bool = True  # plain next-token accuracy: HF forward on the raw context, greedy argmax
    reasoning: bool = True  # next-token-reasoning accuracy through the rollout engine, with data.template
    batch_tokens: int = 8192  # packed context tokens per HF forward (plain accuracy)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _unknown(kind: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else f" Known: {', '.join(known)}."
    return ConfigError(f"unknown {kind} {key!r}.{hint}")


def _coerce(key: str, value, typ: type, from_cli: bool):
    """Check (TOML) or parse (--set) one value against the field's type, then refuse nonsense:
    a non-finite float, an integer past MAX_INT (seeds: MAX_SEED), a control character in a string."""
    value = _typed(key, value, typ, from_cli)
    if typ is float and not math.isfinite(value):
        raise ConfigError(f"{key} = {value!r} is not a finite number; give a finite value, e.g. {key}={_example(typ)}")
    if typ is int and abs(value) > (MAX_SEED if key.endswith(".seed") else MAX_INT):
        raise ConfigError(f"{key} = {value} is beyond any sensible value (at most {MAX_INT:,}); check for a typo")
    if typ is str and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(f"{key} = {value!r} holds a control character; remove it")
    return value


def _typed(key: str, value, typ: type, from_cli: bool):
    if from_cli:
        text = value
        try:
            if typ is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError
                return text.lower() == "true"
            if typ is int:
                return int(text)
            if typ is float:
                return float(text)
            return text
        except ValueError:
            raise ConfigError(f"{key}: cannot read {text!r} as {typ.__name__}; "
                              f"pass e.g. --set {key}={_example(typ)}") from None
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}; "
                          f"write e.g. {key.split('.')[-1]} = {_example(typ)}")
    return value


def _example(typ: type) -> str:
    return {bool: "true", int: "4", float: "0.5", str: '"text"'}[typ]


def from_dict(tree: dict, overrides: list[str] = ()) -> Config:
    """Build a checked Config from a TOML-shaped dict and `section.key=value` overrides."""
    cfg = Config()
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for section, table in tree.items():
        if section not in sections:
            raise _unknown("config section", section, list(sections))
        if not isinstance(table, dict):
            raise ConfigError(f"{section} must be a table ([{section}]), got {table!r}")
        _apply(cfg, section, table.items(), from_cli=False)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key.count(".") != 1:
            raise ConfigError(f"--set {item!r}: write --set section.key=value, e.g. --set train.lr=1e-6")
        section, name = key.split(".")
        if section not in sections:
            raise _unknown("config section", section, list(sections))
        _apply(cfg, section, [(name, value)], from_cli=True)
    return check(cfg)


def _apply(cfg: Config, section: str, items, from_cli: bool) -> None:
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    for name, value in items:
        if name not in hints:
            raise _unknown("config key", f"{section}.{name}", list(hints))
        setattr(obj, name, _coerce(f"{section}.{name}", value, hints[name], from_cli))


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a TOML file (or a preset name such as "parity") and apply overrides."""
    if path is None:
        return from_dict({}, overrides)
    p = Path(path)
    if not p.exists() and p.suffix != ".toml":  # preset names may hold dots (rpt-qwen3-1.7b)
        preset = resources.files("rptfast.configs").joinpath(f"{path}.toml")
        if preset.is_file():
            return from_dict(tomllib.loads(preset.read_text()), overrides)
    if not p.is_file():
        names = sorted(x.name.removesuffix(".toml") for x in resources.files("rptfast.configs").iterdir()
                       if x.name.endswith(".toml"))
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise PathError(f"config file {str(path)!r} {what}; give a TOML path or a preset: {', '.join(names)}")
    try:
        tree = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise FileFormatError(f"config file {str(path)!r} is not valid TOML ({e}); fix the line it names") from None
    except UnicodeDecodeError as e:
        raise FileFormatError(f"config file {str(path)!r} is not UTF-8 text (byte {e.start}); "
                              f"give a TOML file") from None
    except OSError as e:
        raise PathError(f"config file {str(path)!r} cannot be read ({e.strerror}); check its permissions") from None
    return from_dict(tree, overrides)


def flat(cfg: Config) -> dict[str, object]:
    """{"section.key": value} for every field."""
    return {f"{s}.{k}": v for s, table in dataclasses.asdict(cfg).items() for k, v in table.items()}


def to_toml(cfg: Config) -> str:
    """The whole resolved config as TOML (every key, defaults included)."""
    lines = []
    for f in dataclasses.fields(cfg):
        lines.append(f"[{f.name}]")
        for k, v in dataclasses.asdict(getattr(cfg, f.name)).items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)
