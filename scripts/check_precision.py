"""Does mixed precision train like fp32? Train the same run twice, in fp32 and in a lower precision, and
compare the loss curves.

    python scripts/check_precision.py                       # tiny ResNet, 64 px crops, 300 steps, bf16
    python scripts/check_precision.py --preset fast --crop-size 128 --precision bf16   # on an AMX CPU / GPU

Both runs see exactly the same images, crops and pool draws (same seed), so their curves differ only by
arithmetic. For each loss it prints the mean over windows of 50 steps in both runs and the difference in
units of the step-to-step noise (the standard deviation of the fp32 losses in that window): |z| below ~1
means "within noise". Any NaN or infinity is reported. Exit status 1 if a run is not finite or a window
differs by more than 2 noise units.

On a CPU without AMX / AVX512-BF16, bf16 is emulated (slow): keep the default tiny network there.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def train(precision: str, args, run_dir: Path) -> list[dict]:
    from styleshift.config import DiscriminatorConfig, GeneratorConfig, TrainConfig, preset
    from styleshift.trainer import Trainer

    if args.preset:
        cfg = TrainConfig(**preset(args.preset))
    else:
        cfg = TrainConfig(generator=GeneratorConfig(arch="resnet_6blocks", ngf=8, n_blocks=2),
                          discriminator=DiscriminatorConfig(ndf=16))
    cfg = cfg.replace(
        name=precision, content_dir=str(ROOT / "data/sample/photos"), style_dir=str(ROOT / "data/sample/paintings"),
        crop_size=args.crop_size, load_size=args.load_size or round(args.crop_size * 1.12), steps=args.steps,
        decay_steps=0, precision=precision, device=args.device, log_every=1, sample_every=10**9,
        checkpoint_every=10**9, seed=args.seed, num_workers=0,
    )
    Trainer(cfg, run_dir / precision, progress=False).fit()
    lines = (run_dir / precision / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "G_AB" in r]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--preset", choices=["reference", "fast"], help="default: a tiny ResNet-6 (ngf 8)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--load-size", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        runs = {p: train(p, args, Path(tmp)) for p in ("fp32", args.precision)}
    keys = [k for k in runs["fp32"][0] if k not in ("step", "epoch", "lr", "sec_per_step")]
    ok = True
    for p, rows in runs.items():
        bad = [(r["step"], k) for r in rows for k in keys if not math.isfinite(r[k])]
        if bad:
            ok = False
            print(f"{p}: not finite at (step, loss) {bad[:5]}")
    print(f"{args.steps} steps, windows of {args.window}: mean fp32 / mean {args.precision}  (z = difference / "
          "fp32 step-to-step std)")
    print("steps".ljust(12) + "".join(k.rjust(20) for k in keys))
    for start in range(0, args.steps, args.window):
        a = runs["fp32"][start:start + args.window]
        b = runs[args.precision][start:start + args.window]
        cells = []
        for k in keys:
            ma, mb = statistics.fmean(r[k] for r in a), statistics.fmean(r[k] for r in b)
            sd = statistics.pstdev(r[k] for r in a) or 1e-12
            z = (mb - ma) / sd
            ok &= abs(z) <= 2
            cells.append(f"{ma:.3f}/{mb:.3f} z{z:+.1f}".rjust(20))
        print(f"{start + 1}-{start + len(a)}".ljust(12) + "".join(cells))
    speed = {p: statistics.median(r["sec_per_step"] for r in rows) for p, rows in runs.items()}
    print("median s/step: " + ", ".join(f"{p} {s:.3f}" for p, s in speed.items()))
    print("within noise" if ok else "NOT within noise")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
