"""Feature-space metrics of image sets: FID, Inception Score, precision and recall.

The field's numbers (LlamaGen, VAR, TiTok/RAR) come from OpenAI's ADM evaluator: Inception-v3
pool features (2048) of 50,000 samples against a reference batch. vqar computes the same
statistics with torch-fidelity's port of that network (the TF-Inception weights, its resizing
and padding replicated; torch-fidelity reports its FID within about 1e-3 relative of the TF
reference implementation on its own test sets, so figures agree with the official script to the
second decimal), in three feature spaces:

- `inception`: the standard; weights fetched once into torch's hub cache (`vqar.weights`);
- `dinov2`: FD-DINOv2 (Stein et al. 2023) through torch-fidelity, which takes DINOv2 from torch hub;
- a path to a TorchScript file: any network `[B, 3, H, W]` floats in [0, 1] -> `[B, D]` (a
  domain-specific FID, or one that needs no download).

FID is the Fréchet distance of two Gaussians fitted to the features, in float64 with scipy's
stable matrix square root. Running sums (`FeatureStats`) keep memory flat in the number of
images; precision and recall (Kynkäänniemi et al. 2019, k = 3) need the features themselves.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import Tensor

from .weights import FID_INCEPTION, MissingWeights, fetch

FEATURES = ("inception", "dinov2")  # or a path to a TorchScript file


# -- feature extractors ------------------------------------------------------------------------


class Features(torch.nn.Module):
    """Images [B, 3, H, W] in [-1, 1] -> {"features": [B, D] float64, "logits": [B, 1008] (Inception only)}."""

    name: str = ""
    dim: int = 0

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError


def _as_uint8(images: Tensor) -> Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class InceptionFeatures(Features):
    """torch-fidelity's Inception-v3 (the TF FID network): pool features and unbiased logits."""

    name, dim = "inception", 2048

    def __init__(self, *, download: bool = True):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as error:
            raise ImportError(
                "FID with --features inception needs torch-fidelity and its Inception weights: pip install "
                "'vqar[metrics]' (or pass --features PATH to a TorchScript feature network)"
            ) from error
        path = _fetch_or_explain(download)
        # torch-fidelity unpickles its weights file; it holds plain tensors, so load it safely instead
        safe_load = mock.patch("torch.load", lambda f, **_: torch.load(f, weights_only=True, map_location="cpu"))
        with safe_load:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
            )

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        pool, logits = self.net(_as_uint8(images).to(next(self.net.parameters()).device))
        return {"features": pool.double(), "logits": logits.double()}


def _fetch_or_explain(download: bool) -> Path:
    try:
        return fetch(FID_INCEPTION, download=download)
    except MissingWeights as error:
        raise MissingWeights(
            f"{error}. Or measure in another feature space: --features PATH (a TorchScript network "
            "[B, 3, H, W] in [0, 1] -> [B, D])"
        ) from error


class DinoV2Features(Features):
    """DINOv2 ViT-L/14 (FD-DINOv2) through torch-fidelity, which loads it from torch hub."""

    name, dim = "dinov2", 1024

    def __init__(self):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2
        except ImportError as error:
            raise ImportError("--features dinov2 needs torch-fidelity >= 0.4: pip install 'vqar[metrics]'") from error
        try:
            self.net = FeatureExtractorDinoV2("dinov2-vit-l-14", ["dinov2"])
        except Exception as error:  # offline, or torch hub's cache lacks the repository
            raise MissingWeights(
                f"--features dinov2 loads facebookresearch/dinov2 through torch hub ({torch.hub.get_dir()}), which "
                f"failed: {type(error).__name__}: {error}. Run once online, or pass --features PATH"
            ) from error

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        (features,) = self.net(_as_uint8(images).to(next(self.net.parameters()).device))
        return {"features": features.double()}


class ScriptedFeatures(Features):
    """A saved feature network: [B, 3, H, W] floats in [0, 1] -> [B, D]. A TorchScript file
    (`torch.jit.script(net).save(PATH)`), or a `torch.export` program (`torch.export.save(..., PATH.pt2)`,
    what torch recommends now that TorchScript is deprecated)."""

    def __init__(self, path: str | Path):
        super().__init__()
        try:
            if Path(path).suffix == ".pt2":
                self.net = torch.export.load(str(path)).module()
            else:
                with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; the files still load
                    warnings.simplefilter("ignore", FutureWarning)
                    self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as error:
            raise ValueError(
                f"--features {path}: not a TorchScript file or torch.export program ({type(error).__name__}: "
                f"{error}); save a feature network with torch.jit.script(net).save(PATH) or torch.export.save"
            ) from error
        self.name = f"features:{Path(path).name}"

    def train(self, mode: bool = True) -> ScriptedFeatures:
        """A saved network stays as it was saved: an exported program has no train mode to switch to
        (`.train()` raises on it), and a TorchScript one is evaluated in eval mode."""
        self.training = mode
        return self

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        device = next(iter(self.net.parameters()), torch.empty(0)).device
        out = self.net((images.float().clamp(-1, 1).to(device) + 1) / 2)
        if out.ndim != 2:
            raise ValueError(f"the feature network {self.name} must return [B, D], got {tuple(out.shape)}")
        return {"features": out.double()}


def feature_network(spec: str, *, download: bool = True) -> Features:
    """`inception`, `dinov2`, or a path to a TorchScript file or a `torch.export` program (.pt2)."""
    if spec == "inception":
        return InceptionFeatures(download=download)
    if spec == "dinov2":
        return DinoV2Features()
    if Path(spec).is_file():
        return ScriptedFeatures(spec)
    raise ValueError(f"--features must be inception, dinov2 or a TorchScript file; {spec!r} is none of these")


# -- statistics --------------------------------------------------------------------------------


class FeatureStats:
    """Running sums of features [B, D] (float64): their mean and covariance, memory flat in the count."""

    def __init__(self, dim: int | None = None):
        self.n, self.sum, self.outer = 0, None, None
        if dim:
            self._allocate(dim)

    def _allocate(self, dim: int) -> None:
        self.sum, self.outer = np.zeros(dim), np.zeros((dim, dim))

    def add(self, features: Tensor | np.ndarray) -> None:
        x = np.asarray(features.detach().cpu() if isinstance(features, Tensor) else features, dtype=np.float64)
        if self.sum is None:
            self._allocate(x.shape[1])
        self.n += len(x)
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.n:
            if self.sum is None:
                self._allocate(len(other.sum))
            self.n, self.sum, self.outer = self.n + other.n, self.sum + other.sum, self.outer + other.outer
        return self

    @property
    def mu(self) -> np.ndarray:
        return self.sum / self.n

    @property
    def sigma(self) -> np.ndarray:
        """The unbiased covariance (as numpy's `np.cov` and the ADM evaluator compute it)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.n}")
        return (self.outer - self.n * np.outer(self.mu, self.mu)) / (self.n - 1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) in float64, with scipy's matrix square root; a
    near-singular product is offset by eps on the diagonal, as the ADM evaluator and pytorch-fid do."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics differ in size: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product (fewer images than features) is handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * 1e-6
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: the matrix square root has a large imaginary part ({np.abs(covmean.imag).max()})")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def inception_score(logits: np.ndarray | Tensor, splits: int = 10) -> tuple[float, float]:
    """IS from Inception's unbiased logits [N, 1008] (torch-fidelity's and the ADM evaluator's way):
    exp(E KL(p(y|x) || p(y))) over `splits` parts; (mean, std)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    p = logits.softmax(dim=1)
    scores = []
    for part in p.chunk(splits):
        marginal = part.mean(0, keepdim=True)
        kl = (part * (part.clamp_min(1e-30).log() - marginal.clamp_min(1e-30).log())).sum(1).mean()
        scores.append(math.exp(kl.item()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_distances(x: Tensor, k: int) -> Tensor:
    """Each point's distance to its k-th nearest neighbour in x (itself excluded)."""
    distances = torch.cdist(x, x)
    return distances.kthvalue(k + 1, dim=1).values  # 0 is the point itself


def precision_recall(real: np.ndarray | Tensor, fake: np.ndarray | Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): the share of generated features inside the
    real manifold (union of k-NN balls around real features), and of real features inside the generated one."""
    real, fake = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (real, fake))
    if len(real) <= k or len(fake) <= k:
        raise ValueError(
            f"precision/recall with k={k} needs more than {k} images per set, got {len(real)}, {len(fake)}"
        )
    real_radius, fake_radius = _kth_distances(real, k), _kth_distances(fake, k)
    precision = (torch.cdist(fake, real) <= real_radius[None]).any(1).double().mean().item()
    recall = (torch.cdist(real, fake) <= fake_radius[None]).any(1).double().mean().item()
    return precision, recall


@dataclass
class ReferenceStats:
    """Statistics of a reference set in one feature space: reusable as a `.npz` (`mu`, `sigma`)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: str  # which feature space
    count: int = 0

    def save(self, path: str | Path) -> None:
        np.savez(path, mu=self.mu, sigma=self.sigma, features=np.array(self.features), count=np.array(self.count))

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"{path} holds no reference statistics (arrays `mu` and `sigma`); keys: {list(data)}")
            features = str(data["features"]) if "features" in data else "inception"
            return cls(data["mu"], data["sigma"], features, int(data["count"]) if "count" in data else 0)
