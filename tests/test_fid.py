"""Generation metrics: FID as the field computes it (checked against a direct float64 computation and
torch-fidelity), IS, precision/recall, the ADM `.npz`, feature networks, and `vqar evaluate-generation`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tokenize_digits_with_tiny_tokenizer
from scipy import linalg

from vqar.fid import (
    FeatureStats,
    InceptionFeatures,
    ScriptedFeatures,
    feature_network,
    fid,
    frechet_distance,
    inception_score,
    precision_recall,
)
from vqar.generation_metrics import SampleArchive, read_adm_images
from vqar.weights import MissingWeights

REPO = Path(__file__).resolve().parent.parent


def random_features(seed: int, n: int = 500, d: int = 32, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift


def stats_of(features: np.ndarray) -> FeatureStats:
    stats = FeatureStats()
    for chunk in np.array_split(features, 7):  # running sums, batch by batch
        stats.add(chunk)
    return stats


def test_running_statistics_are_numpys_mean_and_covariance():
    x = random_features(0)
    stats = stats_of(x)
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


def test_fid_of_identical_sets_is_zero_and_matches_a_direct_float64_computation():
    a, b = random_features(0), random_features(1, shift=0.3)
    assert abs(fid(stats_of(a), stats_of(a))) < 1e-6
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fid(stats_of(a), stats_of(b)) == pytest.approx(direct, rel=1e-6)


def test_torch_fidelitys_fid_from_the_same_statistics_agrees():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    a, b = stats_of(random_features(2)), stats_of(random_features(3, shift=0.5))
    theirs = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, False)
    assert frechet_distance(a.mu, a.sigma, b.mu, b.sigma) == pytest.approx(
        theirs["frechet_inception_distance"], rel=1e-6
    )


def test_precision_recall_and_inception_score_behave_at_their_extremes():
    a = random_features(4, n=200)
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, a + 100.0) == (0.0, 0.0)
    confident = np.eye(1008)[np.arange(100) % 10] * 50  # ten classes, each predicted with certainty
    score, _ = inception_score(confident, splits=1)
    assert score == pytest.approx(10, rel=1e-3)


def test_the_samples_archive_is_the_adm_evaluators_npz(tmp_path):
    archive = SampleArchive(tmp_path / "samples.npz", count=5, side=8, create=True)
    images = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    archive.write(3, images[3:])
    archive.write(0, images[:3])  # any order: each process writes its own rows
    archive.finish()
    with np.load(tmp_path / "samples.npz") as data:
        assert list(data) == ["arr_0"] and data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 8, 8, 3)
        np.testing.assert_array_equal(data["arr_0"], images)
    np.testing.assert_array_equal(read_adm_images(tmp_path / "samples.npz"), images)
    assert not list(tmp_path.glob(".partial-*"))


def test_inception_offline_is_refused_naming_the_file_the_url_and_the_way_round(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("VQAR_OFFLINE", "1")
    with pytest.raises(MissingWeights) as error:
        InceptionFeatures()
    message = str(error.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in message and "https://github.com/toshas" in message
    assert "--features PATH" in message


def test_a_torchscript_feature_network_works(tmp_path):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    with pytest.warns(FutureWarning):  # TorchScript: deprecated in torch 2.14, still read
        torch.jit.script(net).save(str(tmp_path / "net.pt"))
    features = ScriptedFeatures(tmp_path / "net.pt")
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    out = features(images)["features"]
    assert out.shape == (4, 5) and out.dtype == torch.float64
    expected = net((images + 1) / 2).double()  # the network sees [0, 1]
    torch.testing.assert_close(out, expected)
    exported = torch.export.export(net, (images,), dynamic_shapes=({0: torch.export.Dim("b", min=1)},))
    torch.export.save(exported, str(tmp_path / "net.pt2"))
    program = feature_network(str(tmp_path / "net.pt2")).to("cpu").eval()  # as evaluate-generation prepares it
    torch.testing.assert_close(program(images[:3])["features"], expected[:3])
    (tmp_path / "junk.pt").write_bytes(b"nonsense")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        ScriptedFeatures(tmp_path / "junk.pt")


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory):
    """An untrained tiny prior over the tiny tokenizer's digit tokens, and a TorchScript feature network."""
    from vqar.training.recipes import TrainConfig, parse_recipe
    from vqar.training.train_prior import PriorArgs, train_prior

    root = tmp_path_factory.mktemp("generation")
    tokens = tokenize_digits_with_tiny_tokenizer(root)
    options = {"tokens": tokens, "size": "tiny", "output_dir": root / "prior", "max_steps": 1, "batch_size": 8}
    options |= {"log_with": "none", "eval_every": 0, "save_every": 0, "eval_samples": 0}
    train_prior(*parse_recipe([f"--{k}={v}" for k, v in options.items()], (PriorArgs, TrainConfig)))
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):  # TorchScript, deprecated in torch 2.14 and still read
        torch.jit.script(net).save(str(root / "features.pt"))
    return root


def _evaluate_command(root: Path, output: Path) -> list[str]:
    return [
        "evaluate-generation", "--prior", str(root / "prior" / "prior"), "--reference", "digits",
        "--features", str(root / "features.pt"), "--num_images", "20", "--batch_size", "6",
        "--cfg_scales", "1,2", "--reference_images", "300", "--output", str(output),
    ]  # fmt: skip


def test_evaluate_generation_writes_the_adm_npz_the_statistics_and_a_report(tiny_prior, tmp_path):
    from vqar.cli import main

    main(_evaluate_command(tiny_prior, tmp_path / "one"))
    report = json.loads((tmp_path / "one" / "report.json").read_text())
    assert [r["cfg_scale"] for r in report["rows"]] == [1.0, 2.0]
    for row in report["rows"]:
        assert row["fid"] > 0 and row["num_images"] == 20 and 0 <= row["precision"] <= 1
        assert row["inception_score"] is None  # IS needs Inception's logits
        samples = read_adm_images(tmp_path / "one" / row["samples"])
        assert samples.shape == (20, 16, 16, 3)
    with np.load(tmp_path / "one" / "reference_stats.npz") as stats:  # the reference in the chosen space
        assert stats["mu"].shape == (8,) and stats["sigma"].shape == (8, 8)
    floor = report["settings"]["reference_split_half_fid"]  # the reference's two halves: 150 digits each
    assert 0 < floor < min(row["fid"] for row in report["rows"])  # an untrained prior is far from it
    assert (tmp_path / "one" / "fid_vs_cfg.png").is_file() and "| 2 | 20 |" in (
        tmp_path / "one" / "report.md"
    ).read_text()
    # the statistics are reusable as the reference: the same FID, without reading a real image
    again = _evaluate_command(tiny_prior, tmp_path / "stats")
    again[again.index("digits")] = str(tmp_path / "one" / "reference_stats.npz")
    main(again[:-4] + ["--cfg_scales", "1", "--output", str(tmp_path / "stats")])
    first = json.loads((tmp_path / "stats" / "report.json").read_text())["rows"][0]
    assert first["fid"] == pytest.approx(report["rows"][0]["fid"], rel=1e-9) and first["precision"] is None


def test_two_processes_sample_the_same_images_as_one(tiny_prior, tmp_path):
    from vqar.cli import main

    main(_evaluate_command(tiny_prior, tmp_path / "one"))
    launcher = Path(sys.executable).parent / "accelerate"
    config = REPO / "recipes" / "accelerate" / "cpu-2proc.yaml"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [str(launcher), "launch", "--config_file", str(config), "--main_process_port", "29547", "-m", "vqar"]
    done = subprocess.run(
        command + _evaluate_command(tiny_prior, tmp_path / "two"), env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for scale in ("1", "2"):
        one = read_adm_images(tmp_path / "one" / f"samples_cfg{scale}.npz")
        np.testing.assert_array_equal(one, read_adm_images(tmp_path / "two" / f"samples_cfg{scale}.npz"))
    rows = [json.loads((tmp_path / name / "report.json").read_text())["rows"] for name in ("one", "two")]
    assert [r["fid"] for r in rows[0]] == pytest.approx([r["fid"] for r in rows[1]], rel=1e-6)
