"""Images nobody curated: broken files, every Pillow mode, tiny and bomb-sized images, EXIF rotations."""

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import run, tiny_args

from vqar import VQTokenizer
from vqar.data import ImageDataset, ImageTransform, UnreadableImage, collate_images, decode_image, load_source, to_rgb
from vqar.generation import prefix_from_image


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A valid PNG whose header claims side x side pixels (10^10: ~30 GB decoded) in a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def odd_image_folder(root: Path) -> int:
    """Fourteen readable images (every Pillow mode, a 1x1, an EXIF-rotated one) and five broken files.

    Returns the number of broken ones."""
    rng = np.random.default_rng(0)
    rgb = lambda: Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))  # noqa: E731
    (root / "nested" / "deeper").mkdir(parents=True)
    rgb().save(root / "rgb.png")
    rgb().convert("L").save(root / "gray.png")
    rgb().convert("LA").save(root / "gray_alpha.png")
    rgb().convert("RGBA").save(root / "nested" / "rgba.png")
    rgb().convert("1").save(root / "binary.png")
    rgb().convert("CMYK").save(root / "cmyk.jpg")
    palette = rgb().convert("P")
    palette.save(root / "nested" / "palette.png", transparency=0)
    Image.fromarray(rng.integers(0, 65535, (20, 24), dtype=np.uint16)).save(root / "nested" / "deeper" / "sixteen.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one_pixel.png")  # smaller than one token
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    rgb().save(root / "rotated.jpg", exif=exif)
    for i in range(4):
        rgb().save(root / "nested" / f"extra{i}.jpg")
    png = (root / "rgb.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 3])
    (root / "empty.png").write_bytes(b"")
    (root / "not_an_image.jpg").write_text("hello")
    (root / "garbage.webp").write_bytes(os.urandom(300))
    bomb_png(root / "bomb.png")
    (root / "notes.txt").write_text("not an image, and not picked up")
    return 5


def test_folder_images_in_every_mode_load_and_broken_ones_are_skipped(tmp_path):
    bad = odd_image_folder(tmp_path)
    source = load_source(str(tmp_path))
    assert len(source) == 19  # the .txt file is not an image
    dataset = ImageDataset(source, ImageTransform(16))
    batch = collate_images([dataset[i] for i in range(len(dataset))])
    assert batch["skipped"] == bad
    assert batch["pixels"].shape == (14, 3, 16, 16)
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1


def test_training_on_a_folder_with_broken_images_finishes_and_counts_them(tmp_path):
    odd_image_folder(tmp_path / "images")
    metrics = run(tiny_args(tmp_path / "out", data=tmp_path / "images", batch_size=4, max_steps=6, eval_fraction=0.2))
    assert metrics["steps"] == 6 and metrics["skipped_images"] > 0


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UnreadableImage, match=r"bomb\.png.*(decompression bomb|exceeds limit)"):
        decode_image(str(bomb_png(tmp_path / "bomb.png")))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing was decoded


def test_a_bomb_between_the_warning_and_error_limits_is_refused_too(tmp_path):
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)  # Pillow only warns here, then decodes ~400 MB
    with pytest.raises(UnreadableImage, match="decompression bomb"):
        decode_image(str(bomb_png(tmp_path / "big.png", side)))


def test_exif_rotation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (30, 10)).save(tmp_path / "r.jpg", exif=exif)
    assert to_rgb(decode_image(str(tmp_path / "r.jpg"))).size == (10, 30)


@pytest.mark.parametrize("name", ["truncated.png", "empty.png", "not_an_image.jpg", "garbage.webp", "bomb.png"])
def test_encoding_one_bad_image_names_it(tmp_path, name):
    odd_image_folder(tmp_path)
    tokenizer = VQTokenizer.from_preset("fsq-cpu").eval()
    with pytest.raises(UnreadableImage, match=f"cannot read image .*{name}"):
        prefix_from_image(tokenizer, str(tmp_path / name), 1)


def test_nan_pixels_are_refused_by_name():
    pixels = torch.zeros(1, 3, 32, 32)
    pixels[0, 1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="pixel_values contain NaN"):
        VQTokenizer.from_preset("fsq-cpu").encode(pixels)


# -- no image to train on: errors at start-up, never a run that waits forever ------------------


def test_a_folder_of_only_broken_images_is_an_error_at_start_up_naming_it(tmp_path, no_hang):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    with pytest.raises(ValueError, match=rf"no image of {folder} \(training split\) can be read \(all 3\d images"):
        run(tiny_args(tmp_path / "out", data=folder, batch_size=4))


def test_resize_to_below_the_resolution_is_a_configuration_error_at_start_up(tmp_path, no_hang):
    with pytest.raises(ValueError, match=r"resize_to \(8\) must be >= resolution \(16\)"):
        run(tiny_args(tmp_path, resize_to=8))


def test_a_run_of_empty_batches_is_an_error(tmp_path, monkeypatch, no_hang):
    from vqar.data import Unreadable
    from vqar.training import train_tokenizer

    def nothing_readable(batch):  # every training batch loses all its images
        return collate_images([Unreadable(i, "broken") for i in range(len(batch))])

    monkeypatch.setattr(train_tokenizer, "collate_images", nothing_readable)
    with pytest.raises(RuntimeError, match="8 batches in a row held no readable image"):
        run(tiny_args(tmp_path, max_steps=100))


def test_a_broken_file_is_one_skipped_image_reported_once(tmp_path, caplog):
    broken = odd_image_folder(tmp_path / "images")
    with caplog.at_level("WARNING", logger="vqar"):
        metrics = run(
            tiny_args(
                tmp_path / "out", data=tmp_path / "images", batch_size=4, max_steps=9, repeats=3, eval_fraction=0.2
            )
        )
    reports = [r for r in caplog.records if "unreadable image (reported once)" in r.getMessage()]
    assert 0 < metrics["skipped_images"] <= broken  # distinct files, though each came up in every epoch
    assert len(reports) == metrics["skipped_images"]
