"""Training-time image transforms: crops, flips and channel orders, reproducible from a seed."""

import collections

import numpy as np
import pytest
import torch
from PIL import Image

from vqar.data import ImageTransform


def _photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


def test_random_channels_gives_every_order_of_the_same_pixels_and_repeats_from_a_seed():
    image = _photo()
    plain = ImageTransform(32)(image)
    shuffled = ImageTransform(32, random_channels=True)
    orders = collections.Counter()
    for seed in range(240):
        pixels = shuffled(image, torch.Generator().manual_seed(seed))
        order = tuple(next(j for j in range(3) if torch.equal(pixels[c], plain[j])) for c in range(3))
        assert sorted(order) == [0, 1, 2]  # a permutation of the channels, nothing else changed
        orders[order] += 1
        assert torch.equal(pixels, shuffled(image, torch.Generator().manual_seed(seed)))
    assert len(orders) == 6 and min(orders.values()) > 20  # all six orders, about equally often


def test_without_random_channels_the_colours_stay():
    image = _photo()
    transform = ImageTransform(32, random_crop=True, random_flip=True)
    for seed in range(10):
        pixels = transform(image, torch.Generator().manual_seed(seed))
        assert torch.allclose(pixels.mean((1, 2)), ImageTransform(32)(image).mean((1, 2)), atol=0.05)


def test_a_share_of_random_channels_reorders_about_that_share_of_crops():
    image = _photo()
    plain = ImageTransform(32)(image)
    quarter = ImageTransform(32, random_channels=0.25)
    reordered = sum(not torch.equal(quarter(image, torch.Generator().manual_seed(s)), plain) for s in range(400))
    assert 0.15 * 400 < reordered < 0.25 * 400  # a quarter draw a new order; one in six of those draws the same
    with pytest.raises(ValueError, match="random_channels is a share of crops"):
        ImageTransform(32, random_channels=1.5)
