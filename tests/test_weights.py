"""Published weights (LPIPS's backbone, FID's Inception): fetched once with the hash checked, or a
clear refusal offline. A loopback HTTP server stands in for the download site."""

import hashlib
import http.server
import threading

import pytest

from vqar.weights import LPIPS_BACKBONES, MissingWeights, PublishedWeights, fetch, missing_reason


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("VQAR_OFFLINE", raising=False)


@pytest.fixture
def download_site(tmp_path):
    """Serves tmp_path/site over HTTP on loopback; yields (folder, base URL, requested paths)."""
    site = tmp_path / "site"
    site.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(site), **kwargs)

        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield site, f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


def test_offline_a_missing_backbone_is_refused_naming_the_file_the_place_and_the_way_out(empty_cache):
    from vqar.losses import PerceptualLoss

    with pytest.raises(MissingWeights) as refused:
        PerceptualLoss("vgg")  # conftest runs every test with HF_HUB_OFFLINE=1
    message = str(refused.value)
    assert "offline" in message and str(empty_cache / "vgg16-397923af.pth") in message
    assert LPIPS_BACKBONES["vgg"].url in message and "perceptual_weight to 0" in message
    assert not empty_cache.exists() or not any(empty_cache.iterdir())


def test_a_recipe_with_lpips_stops_at_start_up_when_the_weights_cannot_be_had(empty_cache, tmp_path):
    from test_training import run, tiny_args

    with pytest.raises(MissingWeights, match="LPIPS .*vgg16-397923af.pth"):
        run(tiny_args(tmp_path / "out", perceptual_weight=1.0))


def test_weights_are_downloaded_once_into_the_hub_cache_with_their_hash_checked(
    empty_cache, online, download_site, tmp_path
):
    site, base, requests = download_site
    payload = b"weights" * 1000
    name = f"model-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    (site / name).write_bytes(payload)
    weights = PublishedWeights("a test metric", f"{base}/{name}", "skip it")
    assert missing_reason(weights) is None  # fetched on first use
    assert (empty_cache / name).read_bytes() == payload
    assert fetch(weights) == empty_cache / name and len(requests) == 1  # the second use reads the cache


def test_a_download_with_the_wrong_hash_leaves_nothing_behind(empty_cache, online, download_site):
    site, base, _ = download_site
    (site / "model-0badc0de.pth").write_bytes(b"not the published weights")
    weights = PublishedWeights("a test metric", f"{base}/model-0badc0de.pth", "skip it")
    with pytest.raises(MissingWeights, match=r"the download failed .*hash"):
        fetch(weights)
    assert not (empty_cache / "model-0badc0de.pth").exists()


def test_an_unreachable_site_is_a_clear_refusal(empty_cache, online):
    weights = PublishedWeights("a test metric", "http://127.0.0.1:9/model-12345678.pth", "skip it")
    reason = missing_reason(weights)
    assert "the download failed" in reason and "model-12345678.pth" in reason and "skip it" in reason
