"""Training speed, side by side in one process: the reference CycleGAN vs styleshift.

    python scripts/bench_train.py            # 256 and 128 px, 10 measured steps each
    python scripts/bench_train.py --quick    # 3 measured steps, for a smoke test

(a) a plain fp32 eager implementation of the reference algorithm and networks, written below from the
    reference's cycle_gan_model.py / networks.py (ResNet-9 + 70x70 PatchGAN, instance norm, LSGAN, cycle
    and identity losses, image pool of 50, Adam): what users of the reference run;
(b) styleshift's default path (TrainConfig() defaults, precision auto, its step);
(c) styleshift --preset fast.
Batch 1, real sample crops. The three alternate step by step so machine noise hits them alike; medians
and the ratios b/a and c/a are printed. Peak memory (max RSS) of each is measured in a fresh process.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# -- (a) the reference, faithfully --------------------------------------------------------------------------
class RefResnetBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, padding=0, bias=True), nn.InstanceNorm2d(dim), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, padding=0, bias=True), nn.InstanceNorm2d(dim))

    def forward(self, x):
        return x + self.conv_block(x)


def ref_generator(ngf=64, n_blocks=9):
    norm = nn.InstanceNorm2d  # affine=False, track_running_stats=False: the reference's 'instance' norm
    layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7, padding=0, bias=True), norm(ngf), nn.ReLU(True)]
    for i in range(2):
        mult = 2**i
        layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=True), norm(ngf * mult * 2),
                   nn.ReLU(True)]
    layers += [RefResnetBlock(ngf * 4) for _ in range(n_blocks)]
    for i in range(2):
        mult = 2 ** (2 - i)
        layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1,
                                      bias=True), norm(ngf * mult // 2), nn.ReLU(True)]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7, padding=0), nn.Tanh()]
    return ref_init(nn.Sequential(*layers))


def ref_discriminator(ndf=64, n_layers=3):
    layers = [nn.Conv2d(3, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers):
        prev, mult = mult, min(2**n, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=True), nn.InstanceNorm2d(ndf * mult),
                   nn.LeakyReLU(0.2, True)]
    prev, mult = mult, min(2**n_layers, 8)
    layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=True), nn.InstanceNorm2d(ndf * mult),
               nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
    return ref_init(nn.Sequential(*layers))


def ref_init(net):
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.constant_(m.bias, 0.0)
    return net


class RefImagePool:
    def __init__(self, size=50):
        self.size, self.images = size, []

    def query(self, images):
        out = []
        for image in images:
            image = torch.unsqueeze(image.data, 0)
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif random.uniform(0, 1) > 0.5:
                i = random.randint(0, self.size - 1)
                out.append(self.images[i].clone())
                self.images[i] = image
            else:
                out.append(image)
        return torch.cat(out, 0)


class RefCycleGAN:
    """cycle_gan_model.py's optimize_parameters, step for step."""

    def __init__(self):
        self.netG_A, self.netG_B = ref_generator(), ref_generator()
        self.netD_A, self.netD_B = ref_discriminator(), ref_discriminator()
        self.pool_A, self.pool_B = RefImagePool(), RefImagePool()
        self.mse, self.l1 = nn.MSELoss(), nn.L1Loss()
        self.opt_G = torch.optim.Adam(itertools.chain(self.netG_A.parameters(), self.netG_B.parameters()),
                                      lr=2e-4, betas=(0.5, 0.999))
        self.opt_D = torch.optim.Adam(itertools.chain(self.netD_A.parameters(), self.netD_B.parameters()),
                                      lr=2e-4, betas=(0.5, 0.999))

    def gan(self, pred, real):
        return self.mse(pred, torch.tensor(1.0 if real else 0.0).expand_as(pred))

    def train_step(self, real_A, real_B):
        fake_B = self.netG_A(real_A)
        rec_A = self.netG_B(fake_B)
        fake_A = self.netG_B(real_B)
        rec_B = self.netG_A(fake_A)
        for p in itertools.chain(self.netD_A.parameters(), self.netD_B.parameters()):
            p.requires_grad = False
        self.opt_G.zero_grad()
        idt_A = self.netG_A(real_B)
        idt_B = self.netG_B(real_A)
        loss_G = (self.gan(self.netD_A(fake_B), True) + self.gan(self.netD_B(fake_A), True)
                  + self.l1(rec_A, real_A) * 10 + self.l1(rec_B, real_B) * 10
                  + self.l1(idt_A, real_B) * 5 + self.l1(idt_B, real_A) * 5)
        loss_G.backward()
        self.opt_G.step()
        for p in itertools.chain(self.netD_A.parameters(), self.netD_B.parameters()):
            p.requires_grad = True
        self.opt_D.zero_grad()
        for netD, real, fake in ((self.netD_A, real_B, self.pool_B.query(fake_B)),
                                 (self.netD_B, real_A, self.pool_A.query(fake_A))):
            loss_D = (self.gan(netD(real), True) + self.gan(netD(fake.detach()), False)) * 0.5
            loss_D.backward()
        self.opt_D.step()


# -- (b), (c): styleshift -------------------------------------------------------------------------------------
def styleshift_model(preset_name: str, size: int):
    from styleshift.config import TrainConfig, preset
    from styleshift.cyclegan import CycleGAN
    from styleshift.precision import Precision

    cfg = TrainConfig(**preset(preset_name)).replace(crop_size=size, load_size=size)
    precision = Precision.resolve(cfg.precision, torch.device("cpu"))
    model = CycleGAN(cfg, precision, total_steps=10**6, decay_start=10**6)
    if cfg.compile:
        model.wrap(lambda _, net: torch.compile(net))
    return model, precision.name


def make(name: str, size: int):
    if name == "a":
        return RefCycleGAN(), "fp32"
    return styleshift_model("reference" if name == "b" else "fast", size)


def batch(size: int):
    """Two real sample photos/paintings, centre-cropped to `size`, in [-1, 1]."""
    from styleshift.data import fixed_images

    photos = sorted((ROOT / "data/sample/photos").glob("*.jpg"))
    paintings = sorted((ROOT / "data/sample/paintings").glob("*.jpg"))
    a = fixed_images(photos, 1, size, size).float() / 127.5 - 1
    b = fixed_images(paintings, 1, size, size).float() / 127.5 - 1
    return a, b


def time_steps(size: int, warmup: int, steps: int) -> dict[str, list[float]]:
    real_A, real_B = batch(size)
    models = {name: make(name, size) for name in "abc"}
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + steps):
        for name, (model, _) in models.items():
            start = time.perf_counter()
            model.train_step(real_A, real_B)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times, {name: prec for name, (_, prec) in models.items()}


def peak_memory(name: str, size: int, steps: int = 3) -> float:
    """Max RSS (GiB) of a fresh process that builds model `name` and runs `steps` steps."""
    code = (f"import sys, resource; sys.argv=['x']; sys.path.insert(0, {str(ROOT)!r}); "
            f"import scripts.bench_train as b; m,_ = b.make({name!r}, {size}); x = b.batch({size}); "
            f"[m.train_step(*x) for _ in range({steps})]; "
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))")
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child would report
    # its parent's peak whenever that is higher.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return int(out.stdout.split()[-1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 measured steps after 1 warm-up")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    warmup, steps = (1, 3) if args.quick else (2, 10)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    results = {}
    for size in args.sizes:
        times, precisions = time_steps(size, warmup, steps)
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {} if args.no_memory else {k: peak_memory(k, size) for k in "abc"}
        results[size] = {"median_s": med, "precision": precisions, "peak_rss_gib": mem,
                         "b/a": med["b"] / med["a"], "c/a": med["c"] / med["a"]}
        print(f"\n{size}x{size}, batch 1, {steps} steps each (alternating), median seconds per step:")
        labels = {"a": "reference (fp32 eager)", "b": "styleshift default", "c": "styleshift --preset fast"}
        for k in "abc":
            extra = f"   peak RSS {mem[k]:.2f} GiB" if mem else ""
            print(f"  ({k}) {labels[k]:<26} {med[k]:7.3f} s  [{precisions[k]}]{extra}")
        print(f"  b/a = {med['b'] / med['a']:.3f}   c/a = {med['c'] / med['a']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
