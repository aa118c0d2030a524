"""``stethoscope demo``: train TinyGPT on the bundled Python docs with the monitor on.

The training loop is the one a user would write (nanoGPT's ``train.py`` shrunk): AdamW with decoupled
weight decay on matrices only, linear warm-up then cosine decay, gradient clipping at 1.0, and the
three ``Monitor`` calls around it. The defaults are a genuinely healthy run, so the monitor should stay
silent on them; ``pathology=`` swaps in one of :mod:`stethoscope.demo.pathologies`.

Everything random is seeded from ``seed`` (model init under a forked global RNG, batches from a private
generator), so two runs with the same arguments train the same numbers, and the caller's RNG state is
left as it was.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from stethoscope.console import get_console
from stethoscope.demo.corpus import CORPUS_DESCRIPTION, ByteCorpus, decode, encode
from stethoscope.demo.model import GPTConfig, TinyGPT
from stethoscope.demo.pathologies import Pathology, get_pathology
from stethoscope.errors import CriticalFindingError

DEFAULT_STEPS = 300
PLAIN_PROGRESS_MIN = 50  # without a terminal, runs this long print a progress line at every tenth


@dataclass(frozen=True)
class TrainSettings:
    """The healthy recipe. A pathology may override ``lr`` and ``grad_clip`` per step, nothing else."""

    batch_size: int = 16
    lr: float = 1e-3  # peak; a standard choice for a model this small (nanoGPT's shakespeare-char uses it)
    min_lr: float = 1e-4  # where the cosine decay ends
    warmup_steps: int = 20
    weight_decay: float = 0.1  # on matrices and embeddings only, never on biases or LayerNorm gains
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0


def lr_at(step: int, steps: int, s: TrainSettings) -> float:
    """Linear warm-up to ``s.lr`` over ``s.warmup_steps``, then cosine decay to ``s.min_lr`` at the end."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, steps - s.warmup_steps)
    return s.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (s.lr - s.min_lr)


def make_optimizer(model: torch.nn.Module, s: TrainSettings) -> torch.optim.AdamW:
    """AdamW with two groups: decay for tensors of 2+ dims (weights, embeddings), none for the rest."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": s.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas)


def build(
    pathology: str | Pathology = "none",
    seed: int = 0,
    model_config: GPTConfig | None = None,
    settings: TrainSettings | None = None,
) -> tuple[TinyGPT, torch.optim.AdamW, Pathology]:
    """The demo's model (pathology applied) and optimizer, initialised from ``seed``.

    The global RNG is forked, so the caller's random state is untouched.
    """
    path = get_pathology(pathology) if isinstance(pathology, str) else pathology
    settings = settings or TrainSettings()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyGPT(model_config or GPTConfig())
    path.apply(model)  # before the optimizer, so a new parameter is optimised like the others
    return model, make_optimizer(model, settings), path


def train_step(
    model: TinyGPT,
    optimizer: torch.optim.Optimizer,
    path: Pathology,
    settings: TrainSettings,
    step: int,
    steps: int,
    x: torch.Tensor,
    y: torch.Tensor,
    monitor: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns the loss and the total gradient norm (both 0-dim, not synced).

    The step is skipped when the gradient norm is not finite, as ``torch.amp.GradScaler`` does, so one
    bad batch cannot write NaN into every weight.
    """
    path.before_step(step, steps, model)
    lr = path.lr(step, steps, lr_at(step, steps, settings))
    for group in optimizer.param_groups:
        group["lr"] = lr
    _, loss = model(x, y)
    loss.backward()
    if monitor is not None:
        monitor.after_backward()  # read the gradients as backward left them, before clipping
    clip = path.grad_clip(step, steps, settings.grad_clip)
    # clip_grad_norm_ returns the total norm before clipping; max_norm=inf measures without clipping
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip is not None else math.inf)
    if bool(torch.isfinite(norm)):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), norm.detach()


def _default_out(pathology: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = "demo" if pathology == "none" else f"demo-{pathology}"
    base = Path("stethoscope-runs") / f"{stem}-{stamp}"
    out, n = base, 1
    while out.exists():  # two demos in the same second
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _monitor_config(config: Any, quiet: bool, replay: dict) -> Any:
    """The user's monitor config, with ``console.quiet`` forced on when the demo is quiet, and the demo's own
    model factory named for ``stethoscope replay`` unless the config names one (``replay``: its kwargs)."""
    from stethoscope.config import load_config

    cfg = load_config(config).model_copy(deep=True)
    if quiet:
        cfg.console.quiet = True
    if not cfg.incidents.factory:
        cfg.incidents.factory = "stethoscope.demo.replay:model"
        cfg.incidents.factory_kwargs = replay
    return cfg


def run_demo(
    steps: int = DEFAULT_STEPS,
    out: str | Path | None = None,
    pathology: str = "none",
    seed: int = 0,
    quiet: bool = False,
    config: Any = None,
    overwrite: bool = False,
) -> Path:
    """Train the demo model with a :class:`stethoscope.Monitor` attached; return the run directory.

    Args:
        steps: optimizer steps (the default 300 take ~35 s of CPU time, monitor included).
        out: the run directory; default a fresh ``stethoscope-runs/demo[-PATHOLOGY]-YYYYmmdd-HHMMSS``. A
            non-empty folder is refused (:class:`~stethoscope.errors.RunDirError`, raised by the monitor)
            unless ``overwrite``.
        pathology: ``none`` or one of :data:`stethoscope.demo.pathologies.PATHOLOGIES`.
        seed: seeds the model's initialisation and the batches.
        quiet: print nothing (the monitor's console output included).
        config: the monitor configuration (a YAML path, a dict or a ``stethoscope.Config``).
        overwrite: replace the run already in ``out`` (``stethoscope demo --overwrite``).

    Example:
        >>> run_dir = run_demo(steps=20, out="runs/demo-smoke", quiet=True)  # doctest: +SKIP
    """
    from stethoscope.monitor import Monitor

    if steps < 1:
        raise ValueError(f"run_demo needs steps >= 1, got {steps}")
    settings = TrainSettings()
    model, optimizer, path = build(pathology, seed)
    cfg = model.config
    corpus = ByteCorpus()
    batches = corpus.batches(settings.batch_size, cfg.block_size, seed=seed)
    run_dir = Path(out) if out is not None else _default_out(path.name)
    console = get_console()

    replay = {"pathology": path.name, "seed": seed, "steps": steps}  # stethoscope.demo.replay:model's kwargs
    monitor = Monitor(model, optimizer=optimizer, run_dir=run_dir, config=_monitor_config(config, quiet, replay),
                      overwrite=overwrite)
    if not quiet:
        console.print(
            f"[bold]stethoscope demo[/] · TinyGPT {cfg.n_layer}x{cfg.n_embd}, "
            f"{model.num_parameters() / 1e6:.2f} M parameters · {len(corpus) / 1e3:.0f} KB of "
            f"{CORPUS_DESCRIPTION} · {steps} steps of batch {settings.batch_size}x{cfg.block_size} · "
            f"seed {seed}"
        )
        style = "green" if path.name == "none" else "bold magenta"
        console.print(f"pathology [{style}]{path.name}[/]: {path.describe(steps)}")
        console.print(f"run directory: {monitor.run_dir}")

    # The first and the last ten losses, as device tensors (no sync per step). Not a list of every step's
    # loss: thousands of small tensors kept alive fragment the allocator's heap, and the process memory then
    # grows about 1 MiB per step here — memory.leak rightly flags that pattern.
    first_losses: list[torch.Tensor] = []
    last_losses: collections.deque[torch.Tensor] = collections.deque(maxlen=10)
    started = time.perf_counter()
    progress_cm: Any = contextlib.nullcontext()
    # a progress bar with the time left on a terminal; in a log file (no terminal) a plain line at every
    # tenth of a run of PLAIN_PROGRESS_MIN steps or more, since a bar there prints nothing until the end
    plain_every = max(1, steps // 10) if not quiet and not console.is_terminal and steps >= PLAIN_PROGRESS_MIN \
        else 0
    if not quiet and console.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        progress_cm = Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
    try:
        with progress_cm as progress:
            task = progress.add_task("train", total=steps, loss="") if progress is not None else None
            for step in range(steps):
                x, y = next(batches)
                with monitor.step(step):
                    loss, _ = train_step(model, optimizer, path, settings, step, steps, x, y, monitor)
                monitor.log(loss=loss, lr=optimizer.param_groups[0]["lr"])
                if len(first_losses) < 10:
                    first_losses.append(loss)
                last_losses.append(loss)
                if progress is not None:
                    shown = f"loss {loss.item():.3f}" if step % 10 == 0 or step == steps - 1 else None
                    progress.update(task, advance=1, **({"loss": shown} if shown else {}))
                elif plain_every and (step + 1) % plain_every == 0 and step + 1 < steps:
                    monitor.flush()  # this step's own line (if any) first
                    console.print(_progress_line(step + 1, steps, loss.item(), time.perf_counter() - started),
                                  soft_wrap=True)
    except BaseException as exc:
        # stop_on: critical is a deliberate stop, not a crash (as in Monitor.__exit__)
        status = "finished" if isinstance(exc, CriticalFindingError) else "crashed"
        with contextlib.suppress(Exception):
            monitor.close(status=status)
        raise
    elapsed = time.perf_counter() - started
    monitor.flush()  # the last step's console line before the "trained" line, not after it
    if not quiet:
        head = torch.stack(first_losses).mean().item()
        tail = torch.stack(list(last_losses)).mean().item()
        console.print(
            f"trained {steps} steps in {elapsed:.0f} s · loss (mean of 10 steps) {head:.3f} -> {tail:.3f}"
        )
    monitor.close()  # final findings, report.md, and the monitor's summary (verdict, findings, paths)
    if not quiet:
        _print_epilogue(Path(monitor.run_dir), model, path, seed)
    return Path(monitor.run_dir)


def _progress_line(done: int, steps: int, loss: float, elapsed: float) -> str:
    """``demo · step 30/300 (10 %) · loss 2.913 · 4 s elapsed · about 36 s left`` (a log file's progress)."""
    left = elapsed / done * (steps - done)
    return (f"demo · step {done}/{steps} ({100 * done // steps} %) · loss {loss:.3f} · {elapsed:.0f} s elapsed · "
            f"about {left:.0f} s left")


def _print_epilogue(run_dir: Path, model: TinyGPT, path: Pathology, seed: int) -> None:
    """A sample of what the healthy model learned, and how to read the run again."""
    console = get_console()
    if path.name == "none":
        # after close(): the monitor's hooks are off, so sampling is not recorded as training
        model.eval()
        prompt = 'The "for" statement'
        sample = model.generate(
            encode(prompt)[None],
            120,
            temperature=0.8,
            top_k=20,
            generator=torch.Generator().manual_seed(seed),
        )
        text = escape(decode(sample[0]).replace("\n", " "))
        console.print(f"sample from the trained model: [italic]{text}[/]")
    console.print("read the run again:")
    console.print(f"  stethoscope report {run_dir}", soft_wrap=True)
    console.print(f"  stethoscope findings {run_dir}", soft_wrap=True)
