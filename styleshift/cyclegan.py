r"""The CycleGAN training algorithm (Zhu, Park, Isola, Efros, "Unpaired Image-to-Image Translation using
Cycle-Consistent Adversarial Networks", ICCV 2017), read top to bottom.

Domains: A (photos) and B (style images). Networks:
    G_AB: A -> B,  G_BA: B -> A          generators
    D_B: real B vs G_AB(a),  D_A: real A vs G_BA(b)   PatchGAN discriminators

Generator objective (eq. 3 and section 5.2 of the paper), minimised over G_AB and G_BA:
    L_G = L_adv(G_AB) + L_adv(G_BA)
          + lambda * (|G_BA(G_AB(a)) - a|_1 + |G_AB(G_BA(b)) - b|_1)                   cycle consistency
          + lambda * lambda_idt * (|G_AB(b) - b|_1 + |G_BA(a) - a|_1)                   identity
    with L_adv(G_AB) = E[(D_B(G_AB(a)) - 1)^2] for LSGAN (Mao et al. 2017), lambda = 10, lambda_idt = 0.5.

Discriminator objective, halved so D learns slower than G (section 7.1):
    L_D_B = 0.5 * (E[(D_B(b) - 1)^2] + E[D_B(pool_B(G_AB(a)))^2])      and likewise L_D_A,
    where pool_B returns one of the last 50 fakes half of the time (Shrivastava et al. 2017).

Optimisation: Adam(lr 2e-4, beta1 0.5); lr constant, then linear decay to zero.

One step updates both generators (with the discriminators frozen), then both discriminators, and
returns the losses. Work is batched where the algorithm allows: instance norm keeps images independent,
so G_AB(a) and G_AB(b) are one forward of a batch of two, which uses the matrix units better.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .config import TrainConfig
from .losses import gan_loss, l1
from .networks import build_discriminator, build_generator
from .pool import ImagePool
from .precision import Precision

NETWORKS = ("G_AB", "G_BA", "D_A", "D_B")


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel or torch.compile wrapper."""
    while True:
        if hasattr(net, "module"):  # DistributedDataParallel
            net = net.module
        elif hasattr(net, "_orig_mod"):  # torch.compile
            net = net._orig_mod
        else:
            return net


def set_requires_grad(nets: Iterable[nn.Module], flag: bool) -> None:
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


class LinearDecay:
    """Learning-rate factor: 1 until `decay_start`, then linear to 0 at `total` steps.

    An object rather than a lambda so LambdaLR.state_dict() stores it as plain data.
    """

    def __init__(self, decay_start: int, total: int) -> None:
        self.decay_start = decay_start
        self.total = total

    def __call__(self, step: int) -> float:
        if step < self.decay_start:
            return 1.0
        return max(0.0, (self.total - step) / max(1, self.total - self.decay_start))


class CycleGAN:
    """The four networks with their optimizers, schedules, image pools and loss scalers."""

    def __init__(self, cfg: TrainConfig, precision: Precision, total_steps: int, decay_start: int,
                 rank: int = 0) -> None:
        self.cfg = cfg
        self.precision = precision
        device = precision.device
        self.G_AB = build_generator(cfg.generator).to(device)
        self.G_BA = build_generator(cfg.generator).to(device)
        self.D_A = build_discriminator(cfg.discriminator).to(device)
        self.D_B = build_discriminator(cfg.discriminator).to(device)
        betas = (cfg.beta1, cfg.beta2)
        params_G = [*self.G_AB.parameters(), *self.G_BA.parameters()]
        params_D = [*self.D_A.parameters(), *self.D_B.parameters()]
        # The fused kernel updates all parameters in one pass instead of a dozen ops per tensor.
        fused = device.type in ("cpu", "cuda")
        self.opt_G = torch.optim.Adam(params_G, lr=cfg.lr, betas=betas, fused=fused)
        self.opt_D = torch.optim.Adam(params_D, lr=cfg.lr, betas=betas, fused=fused)
        schedule = LinearDecay(decay_start, total_steps)
        self.sched_G = torch.optim.lr_scheduler.LambdaLR(self.opt_G, schedule)
        self.sched_D = torch.optim.lr_scheduler.LambdaLR(self.opt_D, schedule)
        # Different seeds so the two pools do not draw in lockstep; under DDP each rank (process) keeps
        # its own pools of its own fakes, drawing with its own seeds.
        self.pool_A = ImagePool(cfg.pool_size, seed=cfg.seed * 2 + 1 + 1_000_003 * rank)
        self.pool_B = ImagePool(cfg.pool_size, seed=cfg.seed * 2 + 2 + 1_000_003 * rank)
        self.scaler_G = precision.grad_scaler()  # one per optimizer: their gradients differ in scale
        self.scaler_D = precision.grad_scaler()

    # -- the algorithm -----------------------------------------------------------------------------
    def train_step(self, real_A: torch.Tensor, real_B: torch.Tensor) -> dict[str, torch.Tensor]:
        """One update of the generators, then of the discriminators. Returns detached scalar losses
        (tensors, so the caller decides when to synchronise with the device)."""
        cfg, amp = self.cfg, self.precision.autocast
        lam, lam_idt = cfg.lambda_cycle, cfg.lambda_cycle * cfg.lambda_identity
        n = real_A.shape[0]

        # Generators. The discriminators only pass gradients through to their inputs here: freezing
        # their parameters skips their weight gradients. `unwrap` keeps a DDP-wrapped discriminator's
        # reduction bookkeeping out of the generator step.
        D_A, D_B = unwrap(self.D_A), unwrap(self.D_B)
        set_requires_grad((D_A, D_B), False)
        self.opt_G.zero_grad(set_to_none=True)
        with amp():
            if lam_idt > 0:
                fake_B, idt_B = self.G_AB(torch.cat([real_A, real_B])).split(n)
                fake_A, idt_A, rec_A = self.G_BA(torch.cat([real_B, real_A, fake_B])).split(n)
            else:
                fake_B = self.G_AB(real_A)
                fake_A, rec_A = self.G_BA(torch.cat([real_B, fake_B])).split(n)
            rec_B = self.G_AB(fake_A)
            losses = {
                "G_AB": gan_loss(D_B(fake_B), True, cfg.gan_mode),
                "G_BA": gan_loss(D_A(fake_A), True, cfg.gan_mode),
                "cycle_A": l1(rec_A, real_A) * lam,
                "cycle_B": l1(rec_B, real_B) * lam,
            }
            if lam_idt > 0:
                losses["idt_A"] = l1(idt_A, real_A) * lam_idt  # G_BA should leave an A image as it is
                losses["idt_B"] = l1(idt_B, real_B) * lam_idt
        self._update(sum(losses.values()), self.opt_G, self.scaler_G)
        set_requires_grad((D_A, D_B), True)

        # Discriminators, on real images and on fakes from the history pools; real and fake go through
        # in one batch (instance norm keeps them independent).
        self.opt_D.zero_grad(set_to_none=True)
        with amp():
            losses["D_B"] = self._discriminator_loss(self.D_B, real_B, self.pool_B.query(fake_B.detach()))
            losses["D_A"] = self._discriminator_loss(self.D_A, real_A, self.pool_A.query(fake_A.detach()))
        self._update(losses["D_A"] + losses["D_B"], self.opt_D, self.scaler_D)

        self.sched_G.step()
        self.sched_D.step()
        return {k: v.detach() for k, v in losses.items()}

    def _discriminator_loss(self, D: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        n = real.shape[0]
        pred_real, pred_fake = D(torch.cat([real, fake])).split(n)
        mode = self.cfg.gan_mode
        return 0.5 * (gan_loss(pred_real, True, mode) + gan_loss(pred_fake, False, mode))

    @staticmethod
    def _update(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    # -- inference on fixed images (sample grids, evaluation) ------------------------------------------
    @torch.no_grad()
    def translate(self, real_A: torch.Tensor, real_B: torch.Tensor) -> dict[str, torch.Tensor]:
        G_AB, G_BA = unwrap(self.G_AB), unwrap(self.G_BA)
        with self.precision.autocast():
            fake_B, fake_A = G_AB(real_A), G_BA(real_B)
            out = {"real_A": real_A, "fake_B": fake_B, "rec_A": G_BA(fake_B),
                   "real_B": real_B, "fake_A": fake_A, "rec_B": G_AB(fake_A)}
        return {k: v.float() for k, v in out.items()}

    # -- state ---------------------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in NETWORKS}

    def wrap(self, fn: Callable[[str, nn.Module], nn.Module]) -> None:
        """Replace each network by fn(name, network): DistributedDataParallel, torch.compile, ..."""
        for name, net in self.networks().items():
            setattr(self, name, fn(name, net))

    def state_dict(self) -> dict:
        return {
            "nets": {name: unwrap(net).state_dict() for name, net in self.networks().items()},
            "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
            "sched_G": self.sched_G.state_dict(), "sched_D": self.sched_D.state_dict(),
            "scaler_G": self.scaler_G.state_dict(), "scaler_D": self.scaler_D.state_dict(),
            "pool_A": self.pool_A.state_dict(), "pool_B": self.pool_B.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        for name, net in self.networks().items():
            unwrap(net).load_state_dict(state["nets"][name])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        # The schedule's length comes from the current config (a resumed run may be extended); only
        # the position is restored.
        for sched, key in ((self.sched_G, "sched_G"), (self.sched_D, "sched_D")):
            sched.last_epoch = step = state[key]["last_epoch"]
            for group, base_lr, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base_lr * factor(step)
            sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
        if state.get("scaler_G"):
            self.scaler_G.load_state_dict(state["scaler_G"])
            self.scaler_D.load_state_dict(state["scaler_D"])
        device = self.precision.device
        self.pool_A.load_state_dict(state["pool_A"], device)
        self.pool_B.load_state_dict(state["pool_B"], device)
