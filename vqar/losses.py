"""The tokenizer's training losses: regression, LPIPS, PatchGAN adversarial, bottleneck.

- LPIPS: Zhang et al. 2018, through the `lpips` package (its network and calibrated linear
  heads); the ImageNet backbone weights are fetched once into torch's hub cache by
  `vqar.weights` (offline, a missing file stops start-up saying where to put it).
  `random_backbone=True` is for plumbing tests only: its value is not LPIPS.
- PatchGAN discriminator: Isola et al. 2017 (pix2pix), as used by VQGAN (Esser et al. 2021).
- Hinge and non-saturating GAN losses; VQGAN's adaptive weight (ratio of gradient norms at the
  decoder's last layer); LeCAM regularisation (Tseng et al. 2021, arXiv 2104.03310).

Losses return `(loss, logs)`: logs are detached scalars; only the training loop logs them.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.hf_argparser import HfArg

from .weights import LPIPS_BACKBONES, fetch, missing_reason

logger = logging.getLogger(__name__)


def lpips_missing_reason(net: str = "vgg", *, download: bool = True) -> str | None:
    """None when LPIPS can run with real weights here (fetching them if allowed), else why not and the fix."""
    return missing_reason(LPIPS_BACKBONES[net], download=download)


class PerceptualLoss(nn.Module):
    """LPIPS distance per image. Images [B, 3, H, W] in [-1, 1] -> [B]. Frozen."""

    def __init__(self, net: Literal["vgg", "alex"] = "vgg", random_backbone: bool = False, download: bool = True):
        super().__init__()
        if net not in LPIPS_BACKBONES:
            raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}")
        if not random_backbone:
            fetch(LPIPS_BACKBONES[net], download=download)  # torchvision then finds them in its cache
        import lpips

        with warnings.catch_warnings():  # lpips 0.1.4 still calls torchvision's pre-0.13 `pretrained=` API
            warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated")
            warnings.filterwarnings("ignore", message="Arguments other than a weight enum")
            self.net = lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False).eval()
        self.random_backbone = random_backbone
        self.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)  # LPIPS's dropout stays off

    def forward(self, reference: Tensor, estimate: Tensor) -> Tensor:
        return self.net(reference.float(), estimate.float()).flatten()


def regression_loss(kind: Literal["l1", "l2"], reference: Tensor, estimate: Tensor) -> Tensor:
    if kind == "l1":
        return (reference - estimate).abs().mean()
    if kind == "l2":
        return (reference - estimate).pow(2).mean()
    raise ValueError(f"regression loss must be 'l1' or 'l2', got {kind!r}")


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"discriminator norm must be 'batch', 'group' or 'none', got {norm!r}")


class PatchDiscriminator(nn.Module):
    """PatchGAN: images [B, 3, H, W] -> realness logits [B, 1, h, w], one per overlapping patch."""

    def __init__(self, num_layers: int = 3, channels: int = 64, norm: str = "group"):
        super().__init__()
        layers = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(width, out, 4, stride, padding=1, bias=norm == "none"), _norm_layer(norm, out)]
            layers.append(nn.LeakyReLU(0.2))
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.num_layers = num_layers
        self.min_size = 2 ** (num_layers + 2)  # smaller inputs shrink to nothing before the last conv

    def forward(self, images: Tensor) -> Tensor:
        if min(images.shape[-2:]) < self.min_size:
            raise ValueError(
                f"a PatchGAN discriminator with {self.num_layers} layers needs images of at least "
                f"{self.min_size} px, got {tuple(images.shape[-2:])}; lower disc_layers"
            )
        return self.layers(images)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss (VQGAN, Esser et al. 2021). Logits: [B, 1, h, w]."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def non_saturating_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator loss of the original GAN (Goodfellow et al. 2014). Logits: [B, 1, h, w]."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adversarial_loss(kind: str, logits_fake: Tensor) -> Tensor:
    return -logits_fake.mean() if kind == "hinge" else F.softplus(-logits_fake).mean()


D_LOSSES = {"hinge": hinge_d_loss, "non_saturating": non_saturating_d_loss}


def adaptive_weight(reconstruction_loss: Tensor, generator_loss: Tensor, last_layer: Tensor) -> Tensor:
    """VQGAN's balance: ||grad rec|| / ||grad gan|| at the decoder's last layer, clamped to [0, 1e4]."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, 1e4).detach()


def discriminator_accuracy(logits_real: Tensor, logits_fake: Tensor) -> dict[str, Tensor]:
    """How often D calls real patches real (logit > 0) and reconstructed ones fake, and its mean logits.

    Near 0.5 / 0.5 D has nothing to teach; near 1 / 1 it has won, and its gradients push G away
    from the data. Logits: [B, 1, h, w].
    """
    return {
        "disc/accuracy_real": (logits_real > 0).float().mean(),
        "disc/accuracy_fake": (logits_fake < 0).float().mean(),
        "disc/logits_real": logits_real.mean(),
        "disc/logits_fake": logits_fake.mean(),
    }


class LeCAM(nn.Module):
    """LeCAM regulariser: keeps D's outputs near EMAs of its outputs on the other class."""

    def __init__(self, decay: float = 0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        with torch.no_grad():
            self.ema_real.lerp_(logits_real.mean().float(), 1 - self.decay)
            self.ema_fake.lerp_(logits_fake.mean().float(), 1 - self.decay)
        return F.relu(logits_real - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - logits_fake).pow(2).mean()


@dataclass
class LossConfig:
    """Weights and switches of the tokenizer loss; a weight of 0 turns its term off."""

    regression: Literal["l1", "l2"] = HfArg(default="l1", help="the pixel loss")
    regression_weight: float = HfArg(default=1.0, help="weight of the pixel loss")
    perceptual_weight: float | None = HfArg(
        default=None, help="LPIPS weight (VQGAN, LlamaGen: 1.0); default: 1.0 where LPIPS's weights can be had, else 0"
    )
    perceptual_net: Literal["vgg", "alex"] = HfArg(default="vgg", help="LPIPS backbone")
    perceptual_random_backbone: bool = HfArg(default=False, help="plumbing tests only: the figure is then not LPIPS")
    bottleneck_weight: float = HfArg(default=1.0, help="multiplies the quantizer's own (already weighted) loss")
    adversarial_weight: float = HfArg(default=0.1, help="PatchGAN weight (LlamaGen, Open-MAGVIT2: 0.1 to 0.5)")
    disc_start: int = HfArg(default=20000, help="step from which D is trained and applied (LlamaGen: 20k)")
    disc_warmup_steps: int = HfArg(default=0, help="after disc_start, G's adversarial term ramps up over these steps")
    disc_loss: Literal["hinge", "non_saturating"] = HfArg(default="hinge", help="the GAN loss")
    disc_layers: int = HfArg(default=3, help="PatchGAN depth (receptive field 70 px at 3)")
    disc_channels: int = HfArg(default=64, help="PatchGAN width")
    disc_norm: Literal["batch", "group", "none"] = HfArg(default="group", help="PatchGAN normalisation")
    disc_learning_rate: float | None = HfArg(default=None, help="D's learning rate (default: the tokenizer's)")
    adaptive_weight: bool = HfArg(default=True, help="VQGAN's gradient-norm balance of the GAN term")
    lecam_weight: float = HfArg(default=0.0, help="LeCAM regularisation of D (MAGVIT-v2: 0.001); 0 turns it off")

    def __post_init__(self):
        for name in (
            "regression_weight",
            "perceptual_weight",
            "bottleneck_weight",
            "adversarial_weight",
            "lecam_weight",
            "disc_warmup_steps",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.regression not in ("l1", "l2"):
            raise ValueError(f"regression must be 'l1' or 'l2', got {self.regression!r}")
        if self.disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(D_LOSSES)}, got {self.disc_loss!r}")

    @property
    def uses_discriminator(self) -> bool:
        return self.adversarial_weight > 0

    def resolve_perceptual_weight(self) -> float:
        """Fill in an unset `perceptual_weight`: 1.0 when LPIPS's weights are already cached (or a
        random backbone is asked for), else 0 with a note — a quick run never starts a 500 MB download."""
        if self.perceptual_weight is None:
            reason = (
                None if self.perceptual_random_backbone else lpips_missing_reason(self.perceptual_net, download=False)
            )
            self.perceptual_weight = 0.0 if reason else 1.0  # off, silently: not asked for (metrics.json says so)
        return self.perceptual_weight


class TokenizerLoss(nn.Module):
    """The loss triad plus the bottleneck loss. Holds the discriminator and, if on, LPIPS."""

    def __init__(self, config: LossConfig):
        super().__init__()
        self.config = config
        self.perceptual = (
            PerceptualLoss(config.perceptual_net, config.perceptual_random_backbone)
            if config.resolve_perceptual_weight() > 0
            else None
        )
        self.discriminator = (
            PatchDiscriminator(config.disc_layers, config.disc_channels, config.disc_norm)
            if config.uses_discriminator
            else None
        )
        self.lecam = None
        if self.discriminator is not None and config.lecam_weight > 0:
            # A child of D, so its EMAs are saved, restored and synced with D's state.
            self.discriminator.lecam = self.lecam = LeCAM()

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.config.disc_start

    def gan_ramp(self, step: int) -> float:
        """The share of G's adversarial term at `step`: 0 before disc_start, then up to 1 over the warm-up."""
        if not self.gan_active(step):
            return 0.0
        return min(1.0, (step - self.config.disc_start + 1) / max(1, self.config.disc_warmup_steps))

    def generator_loss(
        self, images: Tensor, reconstruction: Tensor, bottleneck_loss: Tensor, step: int, last_layer: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss for the tokenizer's update. images, reconstruction: [B, 3, H, W] in [-1, 1]."""
        c = self.config
        rec = c.regression_weight * regression_loss(c.regression, images, reconstruction)
        logs = {"loss/regression": rec.detach()}
        if self.perceptual is not None:
            perceptual = self.perceptual(images, reconstruction).mean()
            rec = rec + c.perceptual_weight * perceptual
            logs["loss/perceptual"] = perceptual.detach()
        loss = rec + c.bottleneck_weight * bottleneck_loss
        logs["loss/bottleneck"] = bottleneck_loss.detach()
        if self.gan_active(step):
            gan = generator_adversarial_loss(c.disc_loss, self.discriminator(reconstruction))
            weight = adaptive_weight(rec, gan, last_layer) if c.adaptive_weight else torch.ones(())
            loss = loss + self.gan_ramp(step) * c.adversarial_weight * weight * gan
            logs |= {"loss/generator_gan": gan.detach(), "loss/adaptive_weight": weight}
        logs["loss/total"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, images: Tensor, reconstruction: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss for D's update; the reconstruction is detached from the tokenizer."""
        logits_real = self.discriminator(images.detach())
        logits_fake = self.discriminator(reconstruction.detach())
        loss = D_LOSSES[self.config.disc_loss](logits_real, logits_fake)
        logs = {"disc/loss": loss.detach()} | discriminator_accuracy(logits_real.detach(), logits_fake.detach())
        if self.lecam is not None:
            lecam = self.lecam(logits_real, logits_fake)
            loss = loss + self.config.lecam_weight * lecam
            logs["disc/lecam"] = lecam.detach()
        return loss, logs
