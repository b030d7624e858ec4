"""One console line per step, a progress bar, metrics.jsonl, and optional trackers.

Trackers: TensorBoard (log.tensorboard, on by default, needs the `tb` extra:
`pip install 'rptfast[tb]'`; the run says when it is off for want of it), Weights & Biases
(log.wandb) and trackio (log.trackio), both off by default and installed by the user
(`pip install wandb` / `pip install trackio`); set WANDB_MODE=offline to keep wandb off the
network. They get the same numbers as metrics.jsonl, under project log.project, run name
the run directory's name.

Start-up noise: vLLM's import and engine start print library chatter on the CPU (Triton "no
CPU backend", C++ NUMA binding warnings, weight-loading bars). `quiet_startup` sends file
descriptors 1 and 2 to a temporary file while they run and replays it only if start-up fails;
log.verbose = true shows everything.

Only rank 0 writes. MFU divides the update's and the pre-passes' counted FLOPs (model/flops.py: the
decoder's matrices per token, lm_head per scored token, attention per attended pair; a backward twice
its forward) by their time and the dense bf16 peak of the GPU by name (train/step_metrics.py).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from rptfast.errors import appending, atomic_path

log = logging.getLogger("rptfast")

# dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


class Timer:
    """Wall time (and, on CUDA, peak allocated memory) per phase.

    The device is synchronised at both ends so that GPU work lands in its own phase. On
    the CPU the peak is the process's resident high-water mark, which only grows.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = {}
        self.peaks: dict[str, float] = {}  # GiB

    @contextmanager
    def __call__(self, phase: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), peak_memory_gb(self.device))


@contextmanager
def quiet_startup(verbose: bool):
    """Library start-up output (fds 1 and 2, C++ included) into a temp file; replayed on stderr if it fails."""
    if verbose:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read().decode("utf-8", "replace"))


def open_tracker(kind: str, project: str, name: str, run_dir: Path, run_config: dict | None):
    """The wandb or trackio module with a run started; a ConfigError naming the key when it is not installed."""
    from rptfast.config import ConfigError

    try:
        module = __import__(kind)
    except ImportError:
        raise ConfigError(f"log.{kind} = true but {kind} is not installed; pip install {kind}, or set "
                          f"log.{kind}=false") from None
    extra = {"dir": str(run_dir)} if kind == "wandb" else {}
    module.init(project=project, name=name, config=run_config, **extra)
    return module


class MetricsLogger:
    def __init__(self, run_dir: Path, main: bool, total_steps: int, progress: bool, tensorboard: bool, every: int,
                 *, wandb: bool = False, trackio: bool = False, project: str = "rptfast",
                 run_config: dict | None = None):
        self.main, self.every, self.run_dir = main, every, run_dir
        self.no_signal = 0  # consecutive steps that kept no group
        self.jsonl = (run_dir / "metrics.jsonl").open("ab", buffering=0) if main else None
        self.bar = None
        if main and progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, leave=False)
        self.tb = None
        if main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                self.write("TensorBoard off: tensorboard is not installed (pip install 'rptfast[tb]'; "
                           "log.tensorboard=false silences this)")
        self.trackers = [open_tracker(kind, project, run_dir.name, run_dir, run_config)
                         for kind, on in (("wandb", wandb), ("trackio", trackio)) if main and on]

    def restart_at(self, step: int) -> None:
        """Keep only rows up to `step` (the checkpoint a run resumes from; 0 for a fresh start in a
        reused directory): rows a killed run wrote after its checkpoint are redone, not duplicated.
        metrics.jsonl is rewritten under a temp name (a torn last line goes too); TensorBoard
        drops its events after `step` through purge_step."""
        if not self.main:
            return
        path = self.run_dir / "metrics.jsonl"
        self.jsonl.close()
        kept = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line torn by a kill
                continue
            if step > 0 and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line + "\n")
        with atomic_path(path) as tmp:
            tmp.write_text("".join(kept))
        self.jsonl = path.open("ab", buffering=0)
        if self.tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb.close()
            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=step + 1 if step else 0)

    def log(self, step: int, metrics: dict) -> None:
        if not self.main:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        data = (json.dumps(row) + "\n").encode()
        with appending(self.jsonl.name):  # a full disk: DiskFullError naming metrics.jsonl, no torn line
            while data:  # unbuffered: a short write is possible, and nothing is left to flush later
                data = data[self.jsonl.write(data):]
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        for t in self.trackers:
            t.log(numbers, step=step)
        if self.bar is not None:
            self.bar.update(1)
        if step % self.every == 0 or metrics.get("skipped") or metrics.get("skip_reason"):
            self.write(console_line(row))
        self.no_signal = self.no_signal + 1 if metrics.get("skip_reason") == "all_equal" else 0
        if self.no_signal == NO_SIGNAL_STEPS:
            self.write(no_signal_warning(self.no_signal, metrics.get("reward")))

    def write(self, text: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        for t in self.trackers:
            t.finish()


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


# (key, label, format) in console order; missing keys are left out of the line
CONSOLE = [
    ("phase", "", "{}"), ("loss", "loss", "{:.4f}"), ("reward", "reward", "{:.3f}"),
    ("eval/greedy_acc", "greedy", "{:.3f}"), ("clip_frac", "clip", "{:.3f}"), ("kl", "kl", "{:.4f}"),
    ("entropy", "ent", "{:.3f}"), ("response_len", "len", "{:.1f}"), ("groups_kept", "kept", "{:.0f}"),
    ("mismatch_max", "mism", "{:.1e}"), ("grad_norm", "gnorm", "{:.3f}"), ("lr", "lr", "{:.1e}"),
    ("time/step", "dt", "{:.2f}s"), ("tok_per_s", "tok/s", "{:.0f}"), ("mfu", "mfu", "{:.1%}"),
]


def console_line(row: dict) -> str:
    parts = [f"step {row['step']:5d}"]
    for key, label, fmt in CONSOLE:
        v = row.get(key)
        if v is not None:
            parts.append((label + " " if label else "") + fmt.format(v))
    for k, v in row.items():
        if k.startswith("eval/") and k != "eval/greedy_acc" and isinstance(v, float):
            parts.append(f"{k[5:]} {v:.3f}")
    if row.get("skip_reason") == "all_equal":
        parts.append(f"SKIPPED (no group kept: all_equal_frac {row.get('all_equal_frac', 1.0):.2f}, groups_kept "
                     f"{row.get('groups_kept', 0):.0f}; every group's rewards were equal, so no gradient)")
    elif row.get("skipped"):
        parts.append("SKIPPED (non-finite loss or gradient)")
    return " | ".join(parts)


NO_SIGNAL_STEPS = 3  # consecutive steps without a kept group before the logger warns


def no_signal_warning(steps: int, reward: float | None) -> str:
    """What to tell a user whose dynamic sampling has kept no group for `steps` steps in a row."""
    why = ("no rollout earned a reward" if not reward else
           "every group's rollouts were all right or all wrong together")
    return (f"WARNING: {steps} steps in a row kept no group ({why}; last mean reward {reward or 0.0:.3f}): the "
            f"policy gets no gradient. If none of the G rollouts is ever right, check the samples and the prompt "
            f"with `rptfast inspect`, try another data.template, raise rollout.max_tokens if truncated_frac is "
            f"high, start from a stronger model, or set algorithm.dynamic_sampling_from later")


def read_jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def plot(rows: list[dict], keys: dict[str, str], path: Path, ylabel: str, vline: int | None = None,
         vlabel: str = "") -> Path:
    """One PNG: each key (label -> metric) against step, where present; optional phase boundary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for label, key in keys.items():
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
    if vline is not None:
        ax.axvline(vline, color="gray", linestyle="--", linewidth=1)
        ax.text(vline, ax.get_ylim()[1], " " + vlabel, va="top", ha="left", fontsize=8, color="gray")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
