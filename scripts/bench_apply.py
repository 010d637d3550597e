"""Inference speed and memory: the reference CycleGAN generator vs styleshift's Stylizer.

    python scripts/bench_apply.py            # 512^2, 1024^2, 1536x2048 (+ 4096^2 for b), 100 photos of 512^2
    python scripts/bench_apply.py --quick    # small sizes and few repetitions, for a smoke test
    python scripts/bench_apply.py --json out.json
    python scripts/bench_apply.py --sizes 1536x2048 --reps 1    # only these comparisons
    STYLESHIFT_CPU_BF16=0 python scripts/bench_apply.py         # as on a CPU without bf16 units (b in fp32)

(a) a plain fp32 eager whole-picture forward of the reference ResNet-9 generator (nn.InstanceNorm2d, ngf 64,
    random weights) under torch.no_grad, as the reference's test.py runs it;
(b) styleshift's Stylizer with its defaults (resnet_9blocks, precision auto, tiles sized to the memory
    budget, whole-picture normalisation statistics: styleshift.tiling), called as `apply` calls it: the
    style loaded from a file (random weights too), Stylizer.stylize on the decoded H x W x 3 uint8 pixels,
    returning uint8 pixels.
Times: a and b alternate in one process so machine noise hits them alike; medians and b/a. Peak memory: the
peak RSS (VmHWM) of a fresh process that builds the network and runs one forward at that size, the largest of
--reps such processes. PSNR: b against the Stylizer run whole (tile_size=0), i.e. what tiling changes, on the
8-bit results. Then pictures per second end to end (decode, stylize, encode) through styleshift.apply.convert
on a folder of photos.

Where the CPU has no bf16 units (precision auto = fp32), tiling cannot make the arithmetic cheaper (exact
statistics cost more than a plain forward's arithmetic, see styleshift.tiling); what it buys is bounded
memory and no seams.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_train import ref_generator  # noqa: E402  (the reference generator, written out once)


_STYLES = tempfile.TemporaryDirectory(prefix="bench_apply_")  # removed when the process ends
STYLE = Path(_STYLES.name) / "random.safetensors"  # a child process is given its parent's


def stylizer(**kwargs):
    """A Stylizer of a random-weight default generator, loaded from a style file as `apply` loads one."""
    from styleshift.stylizer import Stylizer

    write_style()
    return Stylizer(STYLE, device="cpu", **kwargs)


def write_style() -> None:
    from styleshift.checkpoint import export_style
    from styleshift.config import GeneratorConfig
    from styleshift.networks import build_generator

    if not STYLE.exists():
        cfg = GeneratorConfig()
        export_style(STYLE, "random", cfg, {d: build_generator(cfg) for d in ("forward", "inverse")})


def pixels(h: int, w: int):
    """A real sample photo resized to h x w: H x W x 3 uint8, as styleshift.images decodes it."""
    import numpy as np
    from PIL import Image

    with Image.open(sorted((ROOT / "data/sample/photos").glob("*.jpg"))[4]) as im:
        return np.asarray(im.convert("RGB").resize((w, h), Image.BICUBIC))


def picture(h: int, w: int) -> torch.Tensor:
    """The same photo as a 1 x 3 x H x W float tensor in [-1, 1], the reference's input."""
    return torch.from_numpy(pixels(h, w).astype("float32")).permute(2, 0, 1)[None] / 127.5 - 1


def child(which: str, h: int, w: int, style: str) -> None:
    """Run in a fresh process: one forward, then print the peak RSS in MiB."""
    global STYLE
    STYLE = Path(style)  # made by the parent: writing it would add to this process's peak
    if which == "a":
        x = picture(h, w)
        net = ref_generator().eval()
        with torch.no_grad():
            net(x)
    else:
        stylizer().stylize(pixels(h, w))
    print(peak_rss_mib())


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over
    fork and exec, so a child would report its parent's peak whenever that is higher."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def peak_rss(which: str, h: int, w: int, runs: int = 1) -> float:
    """The largest peak RSS of `runs` fresh processes: b's varies by up to a third from run to run (how
    glibc's heap fragments while styleshift.heap keeps freed feature maps), and the worst is what a user
    must have free."""
    peaks = []
    for _ in range(runs):
        write_style()
        out = subprocess.run([sys.executable, __file__, "--child", which, str(h), str(w), str(STYLE)],
                             capture_output=True, text=True, check=True)
        peaks.append(float(out.stdout.split()[-1]))
    return max(peaks)


def psnr(a, b) -> float | None:
    """PSNR of two 8-bit pictures; None when they are identical (JSON has no infinity)."""
    mse = float(((a.astype("float64") - b) ** 2).mean())
    return 10 * math.log10(255.0**2 / mse) if mse > 0 else None


def compare(h: int, w: int, reps: int) -> dict:
    x, photo = picture(h, w), pixels(h, w)
    ref = ref_generator().eval()
    ours = stylizer()
    with torch.no_grad():  # warm-up: first-call allocations, and the Stylizer's one-off tiling probe
        ref(x[..., :64, :64])
    ours.stylize(photo[:64, :64])
    times = {"a": [], "b": []}
    for _ in range(reps):
        t = time.perf_counter()
        with torch.no_grad():
            ref(x)
        times["a"].append(time.perf_counter() - t)
        t = time.perf_counter()
        y = ours.stylize(photo)
        times["b"].append(time.perf_counter() - t)
    whole = stylizer(tile_size=0)
    whole.net.load_state_dict(ours.net.state_dict())
    row = {"size": f"{h}x{w}", "time_a_s": statistics.median(times["a"]), "time_b_s": statistics.median(times["b"]),
           "psnr_b_vs_untiled_db": psnr(y, whole.stylize(photo))}
    del whole, y
    row["rss_a_mib"], row["rss_b_mib"] = peak_rss("a", h, w, reps), peak_rss("b", h, w, reps)
    row["time_ratio_b_a"] = row["time_b_s"] / row["time_a_s"]
    row["rss_ratio_b_a"] = row["rss_b_mib"] / row["rss_a_mib"]
    return row


def folder_rate(n: int, side: int) -> dict:
    """Pictures per second through the library's batch path: decode, stylize, encode."""
    from PIL import Image

    from styleshift.apply import convert, plan

    photos = sorted((ROOT / "data/sample/photos").glob("*.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "photos"
        src.mkdir()
        for i in range(n):
            with Image.open(photos[i % len(photos)]) as im:
                im.convert("RGB").resize((side, side), Image.BICUBIC).save(src / f"{i:03d}.jpg", quality=95)
        s = stylizer()
        jobs = plan(src, Path(tmp) / "out", s.name)
        t = time.perf_counter()
        summary = convert(jobs, s.stylize_picture, progress=False)
        elapsed = time.perf_counter() - t
    return {"pictures": n, "side": side, "converted": summary.converted, "pictures_per_s": n / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 repetition, 8 photos of 256 px")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--reps", type=int, help="timed repetitions per size [3; 1 with --quick]")
    ap.add_argument("--sizes", help="compare only these sizes, e.g. 1024x1024,1536x2048 (no 4096 px, no folder)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), args.child[3])
        return
    if args.quick:
        sizes, reps, big, folder = [(256, 256), (512, 512), (768, 1024)], 1, (1536, 2048), (8, 256)
    else:
        sizes, reps, big, folder = [(512, 512), (1024, 1024), (1536, 2048)], 3, (4096, 4096), (100, 512)
    reps = args.reps or reps
    if args.sizes:
        sizes, big, folder = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")], None, None
    from styleshift.precision import resolve_precision

    precision = resolve_precision("auto", torch.device("cpu"))
    result = {"threads": torch.get_num_threads(), "precision_b": precision, "sizes": []}
    print(f"{result['threads']} threads; b computes in {precision}")
    print(f"{'size':>10} {'a s':>7} {'b s':>7} {'b/a':>5} {'a MiB':>7} {'b MiB':>7} {'b/a':>5} {'PSNR dB':>8}")
    for h, w in sizes:
        r = compare(h, w, reps)
        result["sizes"].append(r)
        print(f"{r['size']:>10} {r['time_a_s']:7.2f} {r['time_b_s']:7.2f} {r['time_ratio_b_a']:5.2f} "
              f"{r['rss_a_mib']:7.0f} {r['rss_b_mib']:7.0f} {r['rss_ratio_b_a']:5.2f} "
              f"{r['psnr_b_vs_untiled_db'] or math.inf:8.1f}", flush=True)
    if big is None:
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return
    t = time.perf_counter()
    result["large"] = {"size": f"{big[0]}x{big[1]}", "rss_b_mib": peak_rss("b", *big),
                       "time_b_s_including_start": time.perf_counter() - t}
    print(f"b alone at {big[0]}x{big[1]}: peak RSS {result['large']['rss_b_mib']:.0f} MiB, "
          f"{result['large']['time_b_s_including_start']:.1f} s with process start", flush=True)
    result["folder"] = folder_rate(*folder)
    print(f"{folder[0]} photos of {folder[1]} px end to end: {result['folder']['pictures_per_s']:.2f} pictures/s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
