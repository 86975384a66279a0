"""Publishing: model cards, the dry-run folder, the push boundary, and a real push and download
against a loopback Hub (tests/hub_server.py says what that server does not cover)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from hub_server import LoopbackHub

from vqar import VQTokenizer
from vqar.hub import push, tokenizer_card

REPORT = {
    "tokens_per_image": 64,
    "bits_per_image": 297.2,
    "bits_per_pixel": 1.16,
    "tsr": 6.0,
    "psnr": 24.5,
    "ssim": 0.81,
    "lpips": None,
    "rfid": None,
    "codebook_usage": 0.9,
    "code_perplexity": 20.0,
    "dead_codes": 2,
    "prior_bits_per_image": 150.0,
    "images": 10,
    "resolution": 16,
    "data": "digits",
    "tokenizer": "t",
    "jpeg": {"quality": 20, "bits_per_image": 300.0, "psnr": 20.0, "ssim": 0.7},
    "webp": {"quality": 10, "bits_per_image": 290.0, "psnr": 21.0, "ssim": 0.72},
}


@pytest.fixture
def folders(tmp_path):
    from conftest import TINY_F2

    from vqar import TokenizerConfig

    VQTokenizer(TokenizerConfig(**TINY_F2)).save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.json").write_text(json.dumps(REPORT))
    (tmp_path / "report" / "samples.png").write_bytes(b"\x89PNG fake")
    return tmp_path


def _metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_model_card_has_metadata_table_image_and_usage():
    config = json.loads(json.dumps({"quantizer": {"kind": "fsq"}, "layout": "grid"}))
    card = tokenizer_card("me/digits-fsq", REPORT, config)
    meta = _metadata(card)
    assert meta["library_name"] == "vqar" and {"vqar", "fsq", "image-tokenizer"} <= set(meta["tags"])
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["psnr"] == 24.5 and metrics["prior_bits_per_image"] == 150.0 and "lpips" not in metrics
    assert "| tokenizer |" in card and "jpeg q=20" in card and "![" in card and "samples.png" in card
    assert 'VQTokenizer.from_pretrained("me/digits-fsq")' in card


def test_dry_run_writes_exactly_the_upload_folder(folders):
    (tokenizer_folder,) = push(
        str(folders / "tokenizer"), "me/t", str(folders / "report"), dry_run=True, output=str(folders / "out")
    )
    assert sorted(p.name for p in tokenizer_folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "report.json",
        "samples.png",
    ]
    assert VQTokenizer.from_pretrained(tokenizer_folder).codebook_size == 25


def test_push_without_network_fails_clearly(folders, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ConnectionError, match=r"could not upload to the Hub .*me/t.*--dry-run --output DIR"):
        push(str(folders / "tokenizer"), "me/t", str(folders / "report"), output=str(folders / "out"))


def test_push_then_download_then_load_offline_through_a_loopback_hub(folders):
    script = textwrap.dedent(f"""
        import json, sys, torch
        from vqar import VQTokenizer
        from vqar.hub import push
        stage = sys.argv[1]
        if stage == "push":
            push({str(folders / "tokenizer")!r}, "me/tiny", {str(folders / "report")!r}, output={str(folders / "out")!r})
        tokenizer = VQTokenizer.from_pretrained("me/tiny")
        reference = VQTokenizer.from_pretrained({str(folders / "tokenizer")!r})
        same = all(torch.equal(a, b) for a, b in zip(tokenizer.state_dict().values(), reference.state_dict().values()))
        print(json.dumps({{"same": same}}))
    """)
    with LoopbackHub() as hub:
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.endpoint,
            "HF_HOME": str(folders / "hf"),
            "HF_TOKEN": "hf_test",
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
        }
        online = subprocess.run(
            [sys.executable, "-c", script, "push"], env=env, capture_output=True, text=True, timeout=240
        )
        assert online.returncode == 0, online.stderr[-3000:] + "\n".join(hub.state.requests)
        assert json.loads(online.stdout.strip().splitlines()[-1])["same"]
        assert set(hub.state.repos["me/tiny"]) >= {"config.json", "model.safetensors", "README.md"}
        assert any(r.startswith("GET /me/tiny/resolve/") for r in hub.state.requests)  # the normal download path
    # the server is gone: the cache alone must serve the model
    offline = subprocess.run(
        [sys.executable, "-c", script, "load"],
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert json.loads(offline.stdout.strip().splitlines()[-1])["same"]
