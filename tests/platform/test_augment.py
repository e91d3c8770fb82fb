"""Decoding and augmentation of one sample (docs/model.md §1, §9)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dynroute.models.stem import PIXEL_MEAN_BGR
from dynroute.platform.data.augment import (
    SCALES,
    AugmentParams,
    apply_augmentation,
    augment_train,
    decode_image,
    decode_label,
    eval_sample,
    sample_augmentation,
    scaled_size,
    train_sample,
    transform_eval,
)

MEAN = torch.tensor(PIXEL_MEAN_BGR).view(3, 1, 1)


def encode(array: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kwargs)
    return buf.getvalue()


def gradient_image(h: int, w: int) -> np.ndarray:
    """(H, W, 3) uint8 with distinct channels and no symmetry."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 7 % 256, y * 11 % 256, (x * 3 + y * 5) % 256], -1).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Decoding


def test_decode_image_gives_bgr_order():
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 1] = (255, 0, 0)  # pure red in RGB
    rgb[1, 2] = (10, 20, 30)
    bgr = decode_image(encode(rgb), id="red")
    assert bgr.shape == (2, 3, 3) and bgr.dtype == np.uint8
    assert bgr[0, 1].tolist() == [0, 0, 255]
    assert bgr[1, 2].tolist() == [30, 20, 10]


def test_decode_image_accepts_gray_and_jpeg():
    gray = np.full((4, 5), 77, np.uint8)
    assert decode_image(encode(gray), id="g").shape == (4, 5, 3)
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[...] = (200, 30, 30)
    bgr = decode_image(encode(rgb, "JPEG", quality=95), id="j").astype(int)
    assert abs(bgr[8, 8, 2] - 200) <= 3 and abs(bgr[8, 8, 0] - 30) <= 3


def test_decode_label_keeps_gray_values_and_palette_indices():
    label = np.array([[0, 1, 255], [18, 3, 3]], np.uint8)
    assert decode_label(encode(label), id="l").tolist() == label.tolist()
    palette = Image.fromarray(label).convert("P")
    palette.putpalette([v for k in range(256) for v in (k, 255 - k, 7)])  # not the identity
    buf = io.BytesIO()
    palette.save(buf, "PNG")
    out = decode_label(buf.getvalue(), id="p")
    assert out.dtype == np.uint8 and out.tolist() == label.tolist()


def test_decode_label_rejects_colour_labels():
    with pytest.raises(ValueError, match=r"lbl7.*mode 'RGB'"):
        decode_label(encode(np.zeros((2, 2, 3), np.uint8)), id="lbl7")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_bytes_raise_value_error_naming_the_id(fmt):
    data = encode(gradient_image(64, 64), fmt)
    with pytest.raises(ValueError, match="frankfurt_000000_000294"):
        decode_image(data[: len(data) // 2], id="frankfurt_000000_000294")
    with pytest.raises(ValueError, match="2008_000002"):
        decode_image(b"not an image", id="2008_000002")


def test_truncated_label_raises_naming_the_id():
    data = encode(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64))
    with pytest.raises(ValueError, match="x_label_id"):
        decode_label(data[:-40], id="x_label_id")


def test_image_and_label_of_different_sizes_are_rejected():
    image = encode(gradient_image(4, 6))
    label = encode(np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="sz1"):
        eval_sample(image, label, id="sz1")


# ---------------------------------------------------------------------------------------------
# Training augmentation


def test_output_shapes_and_types_equal_the_crop():
    image, label = gradient_image(40, 60), np.ones((40, 60), np.uint8)
    for seed in range(10):
        img, lab = augment_train(image, label, crop=(24, 32), rng=np.random.default_rng(seed))
        assert img.shape == (3, 24, 32) and img.dtype == torch.float32
        assert lab.shape == (24, 32) and lab.dtype == torch.int64


def test_padding_is_zero_pixels_and_ignore_label_when_the_image_is_smaller_than_the_crop():
    image = np.full((10, 12, 3), 50, np.uint8)
    label = np.full((10, 12), 3, np.uint8)
    params = AugmentParams(scale=1.0, flip=False, top=0, left=0)
    img, lab = apply_augmentation(image, label, params, crop=(16, 20))
    raw = img + MEAN  # back to 0–255
    assert torch.allclose(raw[:, :10, :12], torch.full((3, 10, 12), 50.0))
    # Padding at the bottom and right: raw 0, so exactly −mean after subtraction.
    assert torch.equal(img[:, 10:, :], (-MEAN).expand(3, 6, 20))
    assert torch.equal(img[:, :10, 12:], (-MEAN).expand(3, 10, 8))
    assert (lab[:10, :12] == 3).all()
    assert (lab[10:, :] == 255).all() and (lab[:, 12:] == 255).all()


def test_padding_after_downscaling_with_a_random_draw():
    image, label = np.full((20, 30, 3), 90, np.uint8), np.full((20, 30), 1, np.uint8)
    img, lab = augment_train(image, label, crop=(24, 32), rng=np.random.default_rng(0),
                             scales=(0.5,))
    assert (lab[:10, :15] == 1).all() and (lab[10:] == 255).all() and (lab[:, 15:] == 255).all()
    assert torch.equal(img[:, 10:], (-MEAN).expand(3, 14, 32))


def test_flip_mirrors_image_and_label_together():
    image = np.zeros((4, 6, 3), np.uint8)
    image[:, 0] = (255, 0, 0)  # left column: B=255 in BGR
    label = np.zeros((4, 6), np.uint8)
    label[:, 0] = 7
    plain = apply_augmentation(image, label, AugmentParams(1.0, False, 0, 0), crop=None)
    flipped = apply_augmentation(image, label, AugmentParams(1.0, True, 0, 0), crop=None)
    assert torch.equal(flipped[0], plain[0].flip(-1))
    assert torch.equal(flipped[1], plain[1].flip(-1))
    assert (flipped[1][:, -1] == 7).all() and (flipped[1][:, :-1] == 0).all()
    assert (flipped[0][0, :, -1] + MEAN[0, 0, 0] == 255).all()  # the blue column moved right


def test_flipped_crop_is_the_crop_of_the_flipped_image():
    image, label = gradient_image(12, 20), (np.arange(240) % 19).reshape(12, 20).astype(np.uint8)
    for scale in (1.0, 2.0):
        params = AugmentParams(scale=scale, flip=True, top=3, left=5)
        img, lab = apply_augmentation(image, label, params, crop=(8, 9))
        whole_img, whole_lab = apply_augmentation(
            image, label, AugmentParams(scale=scale, flip=False, top=0, left=0), crop=None)
        assert torch.allclose(img, whole_img.flip(-1)[:, 3:11, 5:14], atol=1.0)
        assert torch.equal(lab, whole_lab.flip(-1)[3:11, 5:14])


def test_crop_of_a_scaled_image_equals_scaling_everything_then_cropping():
    image = gradient_image(37, 53)
    label = (np.arange(37 * 53) % 19).reshape(37, 53).astype(np.uint8)
    for scale in SCALES:
        sh, sw = scaled_size(37, 53, scale)
        whole = Image.fromarray(image).resize((sw, sh), Image.Resampling.BILINEAR)
        top, left = max(sh - 16, 0) // 2, max(sw - 20, 0) // 3
        params = AugmentParams(scale=scale, flip=False, top=top, left=left)
        img, lab = apply_augmentation(image, label, params, crop=(16, 20))
        ref = np.asarray(whole)[top:top + 16, left:left + 20]  # (h, w, 3) BGR
        h, w = ref.shape[:2]
        got = (img + MEAN)[:, :h, :w].permute(1, 2, 0).numpy()
        assert np.abs(got - ref).max() <= 2.0, scale  # float rounding of the box only
        if scale in (0.5, 1.0, 2.0):  # exact ratios: nearest neighbour has no rounding ties
            ref_lab = np.asarray(Image.fromarray(label).resize((sw, sh),
                                                               Image.Resampling.NEAREST))
            assert lab[:h, :w].tolist() == ref_lab[top:top + h, left:left + w].tolist()


def test_scale_factors_come_from_the_set():
    image, label = gradient_image(40, 30), np.zeros((40, 30), np.uint8)
    seen = set()
    for seed in range(60):
        img, lab = augment_train(image, label, crop=None, rng=np.random.default_rng(seed))
        h, w = lab.shape
        factor = next(s for s in SCALES if scaled_size(40, 30, s) == (h, w))
        seen.add(factor)
        assert img.shape == (3, h, w)
    assert seen == set(SCALES)
    params = [sample_augmentation(height=10, width=10, crop=(4, 4), scales=(0.75, 1.25),
                                  rng=np.random.default_rng(s)) for s in range(30)]
    assert {p.scale for p in params} == {0.75, 1.25}


def test_flip_happens_about_half_the_time_and_never_when_disabled():
    draws = [sample_augmentation(height=8, width=8, crop=(4, 4), rng=np.random.default_rng(s))
             for s in range(400)]
    assert 150 < sum(p.flip for p in draws) < 250
    assert all(0 <= p.top <= max(scaled_size(8, 8, p.scale)[0] - 4, 0) for p in draws)
    off = [sample_augmentation(height=8, width=8, crop=(4, 4), flip=False,
                               rng=np.random.default_rng(s)) for s in range(50)]
    assert not any(p.flip for p in off)


def test_same_generator_seed_gives_the_same_augmentation():
    image, label = gradient_image(50, 70), (np.arange(3500) % 19).reshape(50, 70).astype(np.uint8)
    a = augment_train(image, label, crop=(32, 32), rng=np.random.default_rng(123))
    b = augment_train(image, label, crop=(32, 32), rng=np.random.default_rng(123))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [augment_train(image, label, crop=(32, 32), rng=np.random.default_rng(s))
              for s in range(5)]
    assert any(not torch.equal(a[0], o[0]) for o in others)


def test_from_bytes_matches_the_numpy_functions():
    rgb = gradient_image(30, 41)
    label = (np.arange(30 * 41) % 19).reshape(30, 41).astype(np.uint8)
    image_bytes, label_bytes = encode(rgb), encode(label)
    bgr, lab = decode_image(image_bytes, id="a"), decode_label(label_bytes, id="a")
    for seed in range(8):
        fast = train_sample(image_bytes, label_bytes, id="a", crop=(20, 20),
                            rng=np.random.default_rng(seed))
        slow = augment_train(bgr, lab, crop=(20, 20), rng=np.random.default_rng(seed))
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    assert all(torch.equal(x, y) for x, y in zip(eval_sample(image_bytes, label_bytes, id="a"),
                                                 transform_eval(bgr, lab), strict=True))


def test_eval_transform_keeps_the_size_and_only_subtracts_the_mean():
    bgr = gradient_image(9, 13)
    label = (np.arange(9 * 13) % 19).reshape(9, 13).astype(np.uint8)
    img, lab = transform_eval(bgr, label)
    assert img.shape == (3, 9, 13) and lab.shape == (9, 13)
    expected = torch.from_numpy(bgr).permute(2, 0, 1).float() - MEAN
    assert torch.allclose(img, expected)
    assert lab.dtype == torch.int64 and lab.tolist() == label.tolist()
