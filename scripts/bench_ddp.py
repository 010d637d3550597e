"""Training throughput of 1 process against N processes (DistributedDataParallel under torchrun) on this
machine: steps/s and images/s of `styleshift train`, measured side by side, alternating, in one run.

    python scripts/bench_ddp.py            # --preset fast (128 px crops), 60 steps, 3 rounds
    python scripts/bench_ddp.py --quick    # 64 px crops, 16 steps, 1 round: checks the script works

The cores are split evenly: 1 process gets all of them as threads, N processes get cores / N threads each
(OMP_NUM_THREADS). Each process takes one step with its own batch, so images/s = steps/s x batch x N.
Rates come from metrics.jsonl (the trainer's own timing), leaving out the first window: process start,
imports and warm-up are not counted. Data loading runs in the training process (--workers 0) so the
loader takes no core from the threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(nproc: int, threads: int, args: argparse.Namespace, run_dir: Path) -> float:
    """Steps per second of one training run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "styleshift", "train", str(ROOT / "data/sample/photos"), str(ROOT / "data/sample/paintings"),
           "--run-dir", str(run_dir), "--name", "bench", "--fresh", "--preset", "fast", "--device", "cpu",
           "--steps", str(args.steps), "--log-every", str(args.log_every), "--batch-size", str(args.batch_size),
           "--workers", "0", "--quiet", *args.extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = lines[1:]  # the first window holds the warm-up
    return sum(r["step"] - p["step"] for p, r in zip(lines, timed)) / sum(
        (r["step"] - p["step"]) * r["sec_per_step"] for p, r in zip(lines, timed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small crops, few steps, one round")
    parser.add_argument("--procs", type=int, default=2, help="processes to compare with one [2]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--one-thread", action="store_true",
                        help="also 1 process x 1 thread: tells process parallelism from thread parallelism")
    args = parser.parse_args()
    args.extra = []
    if args.quick:
        args.rounds, args.steps, args.log_every = 1, 16, 4
        args.extra = ["--load-size", "72", "--crop-size", "64"]
    cores = os.cpu_count() or 1
    configs = [(1, cores), (args.procs, max(1, cores // args.procs))] + [(1, 1)] * args.one_thread
    rates: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for n, threads in configs:  # alternating, so a busy spell hits both
                rates[n, threads].append(run(n, threads, args, Path(tmp) / f"run_{n}x{threads}_{round_}"))
                print(f"round {round_ + 1}: {n} process(es) x {threads} thread(s): "
                      f"{rates[n, threads][-1]:.3f} steps/s", flush=True)
    crop = "64" if args.quick else "128"
    print(f"\n{cores} cores, --preset fast, {crop} px crops, batch {args.batch_size} per process, "
          f"{args.steps} steps, median of {args.rounds} round(s)")
    print(f"{'processes':>9} {'threads each':>12} {'steps/s':>8} {'images/s':>9}")
    images = {}
    for n, threads in configs:
        steps = statistics.median(rates[n, threads])
        images[n, threads] = steps * args.batch_size * n
        print(f"{n:>9} {threads:>12} {steps:>8.3f} {images[n, threads]:>9.3f}")
    one, many = configs[0], configs[1]
    print(f"images/s, {many[0]} processes x {many[1]} thread(s) / 1 process x {one[1]} threads: "
          f"{images[many] / images[one]:.2f}x")


if __name__ == "__main__":
    main()
