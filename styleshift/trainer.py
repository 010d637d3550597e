"""The training loop: data in, CycleGAN steps, and everything a run directory holds.

runs/NAME/
    config.json          the full configuration
    metrics.jsonl        one line per `log_every` steps: step, epoch, each loss, lr, seconds per step;
                         with `eval_every`, lines of eval_* measures (see styleshift.evaluate)
    samples/step_*.png   fixed images: real | translated | reconstructed, both directions
    checkpoints/         the last few checkpoints (step_*.pt, each with its SHA-256 in step_*.pt.sha256)
    latest.pt            a link to the newest: everything needed to resume; a damaged one falls back to
                         the newest good checkpoint (see styleshift.checkpoint)
    NAME.safetensors     the exported style (both generators + config)
    report.html          curves, sample grids and configuration, refreshed at each checkpoint

Running again on a directory that holds latest.pt resumes it; Ctrl-C saves and exits cleanly. Every file
is written atomically, so a run killed at any moment (power cut, SIGKILL, out of memory) resumes from its
last checkpoint, at most `checkpoint_every` steps back.

Under torchrun (DistributedDataParallel) every process trains on its own share of each epoch and keeps its
own image pools; gradients are averaged, so the networks stay identical. A step is a global step: each
process takes it with its own batch, so the effective batch is batch_size x world_size and an epoch has
world_size times fewer steps. Rank 0 alone writes the run directory, every rank resumes from latest.pt.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import distributed as dist
from .checkpoint import export_style, find_resume, rng_state, save_resume, set_aside, set_rng_state
from .config import RESUMABLE, TrainConfig
from .cyclegan import CycleGAN, unwrap
from .data import PairSampler, UnpairedDataset, default_num_workers, find_training_images, fixed_images, make_loader
from .data import to_model_range
from .evaluate import HELD_ASIDE_MAX, TrainingEval, held_aside, relative_name, spread
from .fsutil import atomic_write, atomic_write_text, remove_stale_temporaries
from .precision import Precision, resolve_device
from .styles import check_trainable, register_trained


class ConfigMismatch(ValueError):
    pass


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    total_steps: int
    style_path: Path
    interrupted: bool = False


def schedule_length(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(total steps, step where the linear decay starts)."""
    if cfg.steps is not None:
        decay = cfg.decay_steps if cfg.decay_steps is not None else cfg.steps // 2
        return cfg.steps, max(0, cfg.steps - decay)
    return (cfg.epochs + cfg.decay_epochs) * steps_per_epoch, cfg.epochs * steps_per_epoch


def check_resumable(saved: TrainConfig, wanted: TrainConfig) -> None:
    saved_d, wanted_d = saved.to_dict(), wanted.to_dict()
    changed = sorted(k for k in saved_d if k not in RESUMABLE and saved_d[k] != wanted_d[k])
    if changed:
        diffs = "; ".join(f"{k}: {saved_d[k]} -> {wanted_d[k]}" for k in changed)
        raise ConfigMismatch(f"cannot resume with different settings ({diffs}); use --fresh to start over")


class StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step and save; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _accelerated(net):
    from .kernels import accelerate

    accelerate(net)
    return net


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, fresh: bool = False, progress: bool = True,
                 tensorboard: bool = False):
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.tensorboard, self.tb = tensorboard, None
        self.ctx = dist.context()
        self.device = resolve_device(cfg.device) if self.ctx.world_size == 1 else self.ctx.device(cfg.device)
        self.precision = Precision.resolve(cfg.precision, self.device)
        self.resume_state = None
        found = find_resume(self.run_dir) if not fresh else None
        if found is not None:
            _, self.resume_state = found
            check_resumable(TrainConfig.from_dict(self.resume_state["config"]), cfg)
        self.cfg = cfg
        check_trainable(cfg.name, self.run_dir)  # before any work: the library name must be free or this run's
        self._check_ranks_agree()
        torch.manual_seed(cfg.seed + self.ctx.rank)  # ranks differ where randomness is not data-driven

        files_A = find_training_images(cfg.content_dir, "content", cfg.max_pixels)
        self.held_A = held_aside(files_A, cfg.content_dir, cfg.eval_every, self.resume_state)
        self.files_A = [f for f in files_A if f not in self.held_A]
        self.files_B = find_training_images(cfg.style_dir, "style", cfg.max_pixels)
        if cfg.crop_size > cfg.load_size:
            raise ValueError(f"crop size {cfg.crop_size} is larger than the load size {cfg.load_size}")
        self.sampler = PairSampler(len(self.files_A), len(self.files_B), cfg.seed, self.ctx.rank, self.ctx.world_size)
        dataset = UnpairedDataset(self.files_A, self.files_B, cfg.load_size, cfg.crop_size, cfg.flip, cfg.max_pixels)
        workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(
            self.device, self.ctx.local_world_size)
        self.loader = make_loader(dataset, self.sampler, cfg.batch_size, workers, self.device)
        self.steps_per_epoch = len(self.sampler) // cfg.batch_size
        self.total_steps, decay_start = schedule_length(cfg, self.steps_per_epoch)

        # Channels-last suits GPU tensor cores; on CPUs it measured slower for convolution backward.
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else self.device.type == "cuda"
        self.model = CycleGAN(cfg, self.precision, self.total_steps, decay_start, self.ctx.rank)
        if self.channels_last:
            self.model.wrap(lambda _, net: net.to(memory_format=torch.channels_last))
        # Winograd convolutions (styleshift.kernels) cut the CPU time of the ResNet trunk; they only act on
        # fp32 NCHW tensors on the CPU and leave every other case to the ordinary convolution.
        if cfg.winograd and self.device.type == "cpu":
            self.model.wrap(lambda _, net: _accelerated(net))
        self.step = 0
        if self.resume_state is not None:
            self._restore(self.resume_state)
        if self.ctx.world_size > 1:
            self.model.wrap(lambda _, net: self.ctx.wrap_ddp(net, self.device))
        if cfg.compile:
            self.model.wrap(lambda _, net: torch.compile(net))

    # -- resuming, and keeping the processes of a distributed job in agreement ----------------------------
    def _rank_state(self) -> dict:
        """What differs between ranks: the image pools and the random generators."""
        return {"pool_A": self.model.pool_A.state_dict(), "pool_B": self.model.pool_B.state_dict(),
                "rng": rng_state()}

    def _restore(self, state: dict) -> None:
        if self.ctx.rank == 0:
            own = {"pool_A": state["model"]["pool_A"], "pool_B": state["model"]["pool_B"], "rng": state["rng"]}
        else:  # a rank the saved run did not have (it had fewer processes) starts with empty pools
            own = state.get("other_ranks", {}).get(self.ctx.rank) or self._rank_state()
        self.model.load_state_dict({**state["model"], "pool_A": own["pool_A"], "pool_B": own["pool_B"]})
        set_rng_state(own["rng"])
        self.step = state["step"]

    def _check_ranks_agree(self) -> None:
        """Every process must train the same configuration from the same checkpoint: a rank launched with
        other options, or one that cannot see the run directory, would silently diverge."""
        if not self.ctx.distributed:
            return
        step = self.resume_state["step"] if self.resume_state is not None else None
        views = self.ctx.gather((self.cfg.to_dict(), step))
        for rank, (cfg, step_r) in enumerate(views):
            if cfg != views[0][0]:
                diffs = sorted(k for k in cfg if cfg[k] != views[0][0][k])
                raise ConfigMismatch(f"rank {rank} was launched with other settings than rank 0 ({', '.join(diffs)})")
            if step_r != views[0][1]:
                what = [f"step {s}" if s is not None else "nothing" for s in (step_r, views[0][1])]
                raise ConfigMismatch(f"rank {rank} resumes {what[0]} from {self.run_dir / 'latest.pt'}, rank 0 "
                                     f"{what[1]}: every machine must see the run directory (a shared filesystem)")

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train to the end of the schedule, or until step `stop_at` (then save, as Ctrl-C does)."""
        cfg, main = self.cfg, self.ctx.is_main
        end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        evaluator = None
        if main:  # rank 0 alone writes the run directory, draws the sample grids and evaluates
            self._prepare_run_dir()
            fixed_A = fixed_images(self.files_A, cfg.num_samples, cfg.load_size, cfg.crop_size, cfg.max_pixels)
            fixed_B = fixed_images(self.files_B, cfg.num_samples, cfg.load_size, cfg.crop_size, cfg.max_pixels)
            evaluator = self._evaluator() if cfg.eval_every else None
        bar = self._progress_bar()
        sums: dict[str, torch.Tensor] = {}
        window_start, window_steps = time.perf_counter(), 0
        batches = self._batches()
        with StopRequest() as stop:
            while self.step < end and not self.ctx.any(stop.requested):
                batch = next(batches)
                real_A = to_model_range(batch["A"], self.device, self.channels_last)
                real_B = to_model_range(batch["B"], self.device, self.channels_last)
                lr = self.model.opt_G.param_groups[0]["lr"]  # the rate this step uses
                losses = self.model.train_step(real_A, real_B)
                self.step += 1
                window_steps += 1
                for k, v in losses.items():  # summed on the device: no synchronisation per step
                    sums[k] = sums[k] + v if k in sums else v.clone()
                if self.step % cfg.log_every == 0:
                    elapsed = time.perf_counter() - window_start
                    self._log(sums, window_steps, elapsed, lr, bar)
                    sums, window_start, window_steps = {}, time.perf_counter(), 0
                bar.update(1)
                if main and (self.step % cfg.sample_every == 0 or self.step == self.total_steps):
                    self._save_samples(fixed_A, fixed_B)
                if evaluator and (self.step % cfg.eval_every == 0 or self.step == self.total_steps):
                    self._evaluate(evaluator)
                if self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self._checkpoint()
            if window_steps:  # a stop mid-window still logs the steps it took
                self._log(sums, window_steps, time.perf_counter() - window_start, lr, bar)
            interrupted = self.step < self.total_steps
            self._checkpoint()
        self.ctx.barrier()  # no rank returns (or exits) before rank 0 has written the checkpoint
        bar.close()
        if self.tb is not None:
            self.tb.close()
        if interrupted and main:
            print(f"Stopped at step {self.step}/{self.total_steps}; saved {self.run_dir / 'latest.pt'}. "
                  "Run the same command again to resume.")
        return TrainResult(self.run_dir, self.step, self.total_steps, self.style_path, interrupted)

    def _batches(self):
        """Batches forever, epoch after epoch, starting where self.step says (a resumed run goes on mid-epoch)."""
        epoch, done = divmod(self.step, self.steps_per_epoch)
        start = done * self.cfg.batch_size
        while True:
            self.sampler.set_epoch(epoch, start)
            yield from self.loader
            epoch, start = epoch + 1, 0

    # -- run directory -----------------------------------------------------------------------------
    @property
    def style_path(self) -> Path:
        return self.run_dir / f"{self.cfg.name}.safetensors"

    def _prepare_run_dir(self) -> None:
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.run_dir, recursive=True)  # left by a run killed mid-write
        if self.tensorboard:
            from .tblog import open_tensorboard

            self.tb = open_tensorboard(self.run_dir / "tensorboard")
        atomic_write_text(self.run_dir / "config.json", self.cfg.to_json() + "\n")
        metrics = self.run_dir / "metrics.jsonl"
        if self.resume_state is None:
            metrics.unlink(missing_ok=True)
            aside = set_aside(self.run_dir)  # starting over: the old checkpoints must not mix with the new
            if aside is not None:
                print(f"Starting over; the previous checkpoints are in {aside}", file=sys.stderr)
        elif metrics.exists():
            from .report import read_metrics

            # Lines logged after the checkpoint we resume from would be logged again: drop them. A line a
            # killed run left cut short is not read back, so it goes too.
            keep = [r for r in read_metrics(metrics) if r["step"] <= self.step]
            atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in keep))

    def _progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc=self.cfg.name, unit="step", dynamic_ncols=True,
                    disable=not (self.progress and self.ctx.is_main))

    def _log(self, sums: dict[str, torch.Tensor], steps: int, elapsed: float, lr: float, bar) -> None:
        losses = {k: v.item() / steps for k, v in self.ctx.mean(sums).items()}
        bad = [k for k, v in losses.items() if not torch.isfinite(torch.tensor(v))]
        if bad:
            raise FloatingPointError(f"step {self.step}: loss {', '.join(bad)} is not finite; lower --lr, or "
                                     "use --precision fp32 if mixed precision is on")
        if not self.ctx.is_main:
            return
        record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                  **{k: round(v, 6) for k, v in losses.items()},
                  "lr": lr, "sec_per_step": round(elapsed / steps, 4)}
        self._append_metrics(record)
        g = sum(v for k, v in losses.items() if not k.startswith("D_"))
        bar.set_postfix(G=f"{g:.3f}", D=f"{losses['D_A'] + losses['D_B']:.3f}",
                        cycle=f"{losses['cycle_A'] + losses['cycle_B']:.3f}", refresh=False)

    def _append_metrics(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            self.tb.scalars(record)

    def _evaluator(self) -> TrainingEval:
        cfg = self.cfg
        # A run resumed with evaluation newly on has no held-aside photos: it watches training photos instead.
        photos = self.held_A or spread(self.files_A, HELD_ASIDE_MAX)
        return TrainingEval(photos, self.files_B, cfg.load_size, cfg.crop_size, cfg.seed, bool(self.held_A))

    def _evaluate(self, evaluator: TrainingEval) -> None:
        G, F = unwrap(self.model.G_AB), unwrap(self.model.G_BA)
        record = evaluator(G, F, self.device, self.precision.autocast)
        self._append_metrics({"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), **record})

    def _save_samples(self, fixed_A: torch.Tensor, fixed_B: torch.Tensor) -> None:
        from PIL import Image
        from torchvision.utils import make_grid

        out = self.model.translate(to_model_range(fixed_A, self.device), to_model_range(fixed_B, self.device))
        rows = [torch.stack([out["real_A"][i], out["fake_B"][i], out["rec_A"][i]]) for i in range(len(fixed_A))]
        rows += [torch.stack([out["real_B"][i], out["fake_A"][i], out["rec_B"][i]]) for i in range(len(fixed_B))]
        grid = make_grid(torch.cat(rows), nrow=3, padding=2, pad_value=1.0, normalize=True, value_range=(-1, 1))
        pixels = grid.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
        atomic_write(self.run_dir / "samples" / f"step_{self.step:07d}.png",
                     lambda f: Image.fromarray(pixels).save(f, format="PNG"))
        if self.tb is not None:
            self.tb.image("samples", grid, self.step)

    def _checkpoint(self) -> None:
        # Every rank sends rank 0 what only it has (its pools and random state), so each resumes its own.
        others = self.ctx.gather_to_main(self._rank_state() if self.ctx.rank else None)
        if not self.ctx.is_main:
            return
        cfg = self.cfg
        extra = {"epoch": self.step / self.steps_per_epoch, "total_steps": self.total_steps,
                 "held_aside": [relative_name(f, cfg.content_dir) for f in self.held_A]}
        if self.ctx.distributed:
            extra["other_ranks"] = {rank: state for rank, state in enumerate(others) if rank}
        save_resume(self.run_dir, cfg, self.step, self.model.state_dict(), extra, keep=cfg.keep_checkpoints)
        meta = {"step": self.step, "content_dir": str(cfg.content_dir), "style_dir": str(cfg.style_dir),
                "crop_size": cfg.crop_size, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "run_dir": str(self.run_dir.resolve())}
        nets = {"forward": unwrap(self.model.G_AB), "inverse": unwrap(self.model.G_BA)}
        export_style(self.style_path, cfg.name, cfg.generator, nets, meta)
        register_trained(self.style_path, cfg.name)  # in the style library: --style NAME from anywhere
        from .report import write_report

        try:
            write_report(self.run_dir)
        except Exception as e:  # the report is a view of the run: it must never stop one
            warnings.warn(f"could not write {self.run_dir / 'report.html'}: {e}", stacklevel=2)


def train(cfg: TrainConfig, run_dir: str | Path | None = None, fresh: bool = False, progress: bool = True,
          tensorboard: bool = False) -> TrainResult:
    """Train (or resume) a style; the library entry point behind `styleshift train`."""
    from .styles import runs_dir

    run_dir = run_dir if run_dir is not None else runs_dir() / cfg.name
    return Trainer(cfg, run_dir, fresh, progress, tensorboard).fit()
