"""Reference-image loading (modes, EXIF, alpha) and preprocessing (cover crop, reference rule)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from liveavatar.media.image import (
    fit_image, image_from_tensor, load_image, pil_to_unit_tensor, prepare_reference,
)
from liveavatar.sizes import resolve_output_size


def _gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def test_load_rgba_composited_on_white(tmp_path):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0] = 200
    arr[:4, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB" and img.size == (8, 8)
    px = np.asarray(img)
    assert tuple(px[0, 0]) == (200, 0, 0)
    assert tuple(px[7, 7]) == (255, 255, 255)


def test_load_palette_grey_16bit_and_relative_path(tmp_path, monkeypatch):
    Image.new("P", (5, 4), 3).save(tmp_path / "p.png")
    Image.new("L", (5, 4), 77).save(tmp_path / "g.png")
    Image.fromarray(np.full((4, 5), 65535, np.uint16)).save(tmp_path / "d16.png")
    Image.fromarray(np.full((4, 5), 0.5, np.float32), "F").save(tmp_path / "f.tiff")
    Image.new("CMYK", (5, 4), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    monkeypatch.chdir(tmp_path)
    for name in ["p.png", "g.png", "d16.png", "f.tiff", "c.jpg"]:
        img = load_image(name)  # relative to the current directory
        assert img.mode == "RGB" and img.size == (5, 4), name
    assert tuple(np.asarray(load_image("g.png"))[0, 0]) == (77, 77, 77)
    assert tuple(np.asarray(load_image("d16.png"))[0, 0]) == (255, 255, 255)  # not clipped garbage
    assert tuple(np.asarray(load_image("f.tiff"))[0, 0]) == (128, 128, 128)
    assert tuple(np.asarray(load_image("c.jpg"))[0, 0])[0] >= 250  # CMYK 0 = white


def test_load_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (6, 3), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "o.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "o.jpg").size == (3, 6)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(tmp_path / "bad.png")


def test_image_from_tensor_comfy_layout():
    t = torch.rand(1, 6, 9, 3)
    img = image_from_tensor(t)
    assert img.size == (9, 6) and img.mode == "RGB"
    # exact 8-bit values survive the float round trip (rounding, not truncation)
    u8 = torch.randint(0, 256, (6, 9, 3), dtype=torch.uint8)
    back = np.asarray(image_from_tensor(u8.float() / 255.0))
    assert np.array_equal(back, u8.numpy())
    assert image_from_tensor(torch.rand(2, 4, 4, 3)).size == (4, 4)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        image_from_tensor(torch.rand(4, 5, 2))


@pytest.mark.parametrize("mode", ["exact", "area"])
@pytest.mark.parametrize("src", [(720, 400), (400, 720), (1024, 1024), (333, 517), (64, 900)])
@pytest.mark.parametrize("out", [(704, 384), (384, 256), (512, 512)])
def test_prepare_reference_shape_and_range(mode, src, out):
    x = prepare_reference(_gradient(*src), out[0], out[1], mode=mode)
    assert x.shape == (1, 3, 1, out[1], out[0]) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_exact_mode_covers_without_padding():
    # white image with a different aspect ratio: every output pixel must be white (no black bars)
    img = Image.new("RGB", (400, 720), (255, 255, 255))
    x = prepare_reference(img, 704, 384, mode="exact")
    assert torch.all(x == 1.0)
    # cover scale = max(704/400, 384/720) = 1.76: the middle rows of a 400x720 image survive;
    # a horizontal band in the image centre stays centred
    arr = np.zeros((720, 400, 3), np.uint8)
    arr[350:370] = 255
    y = prepare_reference(Image.fromarray(arr), 704, 384, mode="exact")[0, 0, 0]
    rows = torch.nonzero(y.mean(1) > 0).flatten()
    assert abs((rows.min() + rows.max()).item() / 2 - 191.5) <= 1.5
    assert 30 <= rows.numel() <= 40  # 20 px band x 1.76


def test_exact_mode_warns_about_heavy_crop(caplog):
    prepare_reference(Image.new("RGB", (512, 768)), 704, 384, mode="exact")
    assert "only 36% of its height is kept" in caplog.text
    caplog.clear()
    prepare_reference(Image.new("RGB", (720, 400)), 704, 384, mode="exact")
    assert "cropped" not in caplog.text


def test_area_mode_pads_black_like_the_reference():
    # 720x400 white image at 704x384: resized to 691x384, 6 black columns left, 7 right
    img = Image.new("RGB", (720, 400), (255, 255, 255))
    W, H = resolve_output_size(img.size, "704*384", mode="area")
    assert (W, H) == (704, 384)
    x = prepare_reference(img, W, H, mode="area")[0, :, 0]
    col_black = (x == -1.0).all(0).all(0)
    assert col_black[:6].all() and not col_black[6]
    assert col_black[-7:].all() and not col_black[-8]
    assert col_black.sum().item() == 13
    assert torch.all(x[:, :, 6:-7] == 1.0)


def test_area_mode_crop_centre_rounds_half_to_even():
    # 100x103 image at 100x100: shorter side already 100, crop offset round(1.5) = 2
    arr = np.zeros((103, 100, 3), np.uint8)
    arr[:, :, 0] = np.arange(103, dtype=np.uint8)[:, None]
    out = np.asarray(fit_image(Image.fromarray(arr), 100, 100, mode="area"))
    assert out[0, 0, 0] == 2 and out[-1, 0, 0] == 101


def test_unit_tensor_values():
    img = Image.fromarray(np.array([[[0, 255, 51]]], np.uint8))
    t = pil_to_unit_tensor(img)
    assert t.shape == (3, 1, 1)
    assert torch.allclose(t.flatten(), torch.tensor([-1.0, 1.0, 51 / 255 * 2 - 1]))


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        prepare_reference(Image.new("RGB", (4, 4)), 4, 4, mode="stretch")


# -- pose video (liveavatar.media.pose) --------------------------------------------------------

def _write_pose_video(path, n, fps, w=96, h=64):
    from liveavatar.media.video_writer import VideoWriter
    with VideoWriter(path, w, h, fps=fps, audio_rate=None, crf=0) as vw:
        for i in range(n):
            vw.write_frames(np.full((1, h, w, 3), 40 + 4 * i, np.uint8))


def test_pose_sampling_interval_and_padding(tmp_path):
    from liveavatar.media.pose import frame_interval, load_pose_video
    assert [frame_interval(f, 25) for f in (25, 30, 50, 60, 62.5, 12)] == [1, 1, 2, 2, 2, 1]
    _write_pose_video(tmp_path / "p.mp4", 40, fps=50)  # 40 frames at 50 fps -> 20 sampled
    x = load_pose_video(tmp_path / "p.mp4", 64, 64, num_frames=30, fps=25)
    assert x.shape == (1, 3, 30, 64, 64) and x.dtype == torch.float32
    assert torch.all(x[:, :, 20:] == -1.0)
    # sampled frames are source frames 0, 2, 4, ...: value 40 + 8 k (lossless encode)
    means = (x[0, :, :20].mean(dim=(0, 2, 3)) + 1) / 2 * 255
    expected = torch.tensor([40 + 8.0 * k for k in range(20)])
    assert torch.allclose(means, expected, atol=1.5)


def test_pose_modes_and_errors(tmp_path):
    from liveavatar.media.pose import iter_pose_chunks, load_pose_video
    _write_pose_video(tmp_path / "q.mp4", 10, fps=25, w=96, h=64)
    # area mode at a wider frame: the reference pads with 0 (grey) in [-1, 1] space
    a = load_pose_video(tmp_path / "q.mp4", 128, 64, num_frames=4, mode="area")
    assert a.shape == (1, 3, 4, 64, 128)
    assert torch.all(a[..., :16] == 0.0) and torch.all(a[..., -16:] == 0.0)
    e = load_pose_video(tmp_path / "q.mp4", 128, 64, num_frames=4, mode="exact")
    assert torch.all(e > -0.8)  # covered, no padding
    chunks = list(iter_pose_chunks(tmp_path / "q.mp4", 64, 64, chunk_frames=4, num_chunks=4))
    assert [c.shape[2] for c in chunks] == [4, 4, 4, 4]
    assert torch.all(chunks[2][:, :, 2:] == -1.0) and torch.all(chunks[3] == -1.0)
    assert not torch.all(chunks[2][:, :, :2] == -1.0)
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        load_pose_video(tmp_path / "nope.mp4", 64, 64, 4)


def test_shipped_assets():
    import wave
    from pathlib import Path
    assets = Path(__file__).resolve().parents[1] / "assets"
    img = load_image(assets / "avatar.png")
    assert img.size == (704, 384)
    assert resolve_output_size(img.size, "704x384", mode="area") == (704, 384)
    assert prepare_reference(img, 704, 384).shape == (1, 3, 1, 384, 704)
    with wave.open(str(assets / "speech.wav")) as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (16000, 1, 2)
        assert 3.0 <= f.getnframes() / 16000 <= 4.0
    for name in ("avatar.png", "speech.wav"):
        assert (assets / name).stat().st_size < 200_000
