"""Photos reach training as a viewer shows them: upright, in their colours, whatever the
file's orientation tag, bit depth, mode or transparency.

Each test writes one picture two ways: as a plain upright 8-bit RGB PNG (what a viewer
shows), and as the file a phone, a scanner or an editor would write. Both go through
`load_images`, the script's own loader, and must come out the same: exactly for
lossless files, within JPEG's rounding for JPEGs. The picture is 96 x 64 pixels and
asymmetric (a bright block near one corner), so that a rotation, a flip or a lost
channel moves it far: turned upside down, by 0.44 on average in [-1, 1] units.
"""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import textual_inversion as ti

SIZE = 64  # load_images crops to a square and resizes to this
# JPEG at quality 95 moves this picture's pixels by 0.009-0.010 on average in [-1, 1]
# units, for each orientation (measured; the largest, 0.68, at the red block's edges,
# where JPEG halves the colour resolution); the picture turned upside down is 0.44 away.
JPEG_MEAN_TOLERANCE = 0.05


def upright_picture(height=96, width=64):
    """uint8 [height, width, 3]: smooth gradients, and a saturated block near the top left."""
    y, x = np.mgrid[0:height, 0:width]
    picture = np.stack([200 * x / width, 200 * y / height, np.full_like(x, 60.0)], axis=-1)
    picture[8:30, 6:24] = [250, 30, 40]
    return np.round(picture).astype("uint8")


def loaded(path):
    return ti.load_images([str(path)], SIZE)[0]


def viewers_view(tmp_path, picture):
    """What a viewer shows: `picture` as a plain upright 8-bit RGB PNG, loaded."""
    path = tmp_path / "as-seen.png"
    Image.fromarray(picture, "RGB").save(path)
    return loaded(path)


# The stored pixels of an upright picture, for each EXIF orientation (EXIF 2.32, tag
# 0x0112): the viewer turns them back. Orientation 6, "the 0th row is the visual right
# side", is a photo taken holding the phone upright: stored turned a quarter to the left.
STORED_FOR_ORIENTATION = {
    1: lambda p: p,
    2: lambda p: p[:, ::-1],  # mirrored left to right
    3: lambda p: p[::-1, ::-1],  # upside down
    4: lambda p: p[::-1, :],  # mirrored top to bottom
    5: lambda p: p.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda p: np.rot90(p, 1),  # a quarter turn to the left
    7: lambda p: p.transpose(1, 0, 2)[::-1, ::-1],  # mirrored along the other diagonal
    8: lambda p: np.rot90(p, -1),  # a quarter turn to the right
}


@pytest.mark.parametrize("orientation", sorted(STORED_FOR_ORIENTATION))
def test_a_jpeg_with_an_exif_orientation_trains_upright(tmp_path, orientation):
    picture = upright_picture()
    stored = np.ascontiguousarray(STORED_FOR_ORIENTATION[orientation](picture))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"phone-{orientation}.jpg"
    Image.fromarray(stored, "RGB").save(path, quality=95, exif=exif)
    difference = np.abs(loaded(path) - viewers_view(tmp_path, picture))
    assert difference.mean() < JPEG_MEAN_TOLERANCE


def test_a_16_bit_grayscale_png_trains_in_its_grays_not_white(tmp_path):
    """Pillow opens it in mode I;16 and its convert("RGB") clips every value over 255."""
    gray = upright_picture()[..., 1]
    path = tmp_path / "scan-16.png"
    Image.fromarray(gray.astype("uint16") * 257).save(path)  # 255 * 257 = 65535
    assert Image.open(path).mode == "I;16"
    expected = viewers_view(tmp_path, np.repeat(gray[..., None], 3, axis=-1))
    np.testing.assert_array_equal(loaded(path), expected)


def write_16_bit_rgb_png(path, picture16):
    """A 16-bit RGB PNG, written by hand (Pillow writes 8-bit RGB only)."""
    height, width, _ = picture16.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in picture16)

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16-bit, RGB
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header))
        f.write(chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_16_bit_rgb_png_trains_in_its_colours(tmp_path):
    picture = upright_picture()
    path = tmp_path / "edit-16.png"
    write_16_bit_rgb_png(path, picture.astype("uint16") * 257)
    np.testing.assert_array_equal(loaded(path), viewers_view(tmp_path, picture))


def test_a_32_bit_float_tiff_of_zero_to_one_trains_in_its_grays(tmp_path):
    gray = upright_picture()[..., 0]
    path = tmp_path / "render-32.tiff"
    Image.fromarray(gray.astype("float32") / 255).save(path)
    expected = viewers_view(tmp_path, np.repeat(gray[..., None], 3, axis=-1))
    np.testing.assert_array_equal(loaded(path), expected)


def test_a_32_bit_integer_tiff_trains_scaled_by_its_range(tmp_path):
    gray = upright_picture()[..., 0]
    path = tmp_path / "scan-32.tiff"
    values = np.round(gray.astype("float64") / 255 * (2**31 - 1)).astype("int32")
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I"
    expected = viewers_view(tmp_path, np.repeat(gray[..., None], 3, axis=-1))
    np.testing.assert_array_equal(loaded(path), expected)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK"])
def test_a_grayscale_palette_or_cmyk_file_trains_as_its_rgb_conversion(tmp_path, mode):
    picture = upright_picture()
    converted = Image.fromarray(picture, "RGB").convert(mode)
    path = tmp_path / f"picture-{mode}.{'tiff' if mode == 'CMYK' else 'png'}"
    converted.save(path)
    expected = viewers_view(tmp_path, np.asarray(converted.convert("RGB")))
    np.testing.assert_array_equal(loaded(path), expected)


def test_transparent_pixels_train_as_white(tmp_path):
    """A cut-out on a transparent background: its transparent pixels hold black, which
    a plain RGB conversion would show; a viewer on a page shows white there."""
    picture = upright_picture()
    alpha = np.full(picture.shape[:2], 255, dtype="uint8")
    alpha[:, 40:] = 0  # the right third transparent
    alpha[:, 32:40] = 128  # a half-transparent band
    rgba = np.concatenate([picture, alpha[..., None]], axis=-1)
    rgba[:, 40:, :3] = 0
    path = tmp_path / "cut-out.png"
    Image.fromarray(rgba, "RGBA").save(path)
    shown = picture.astype("float64")
    shown[:, 40:] = 255
    shown[:, 32:40] = np.round((shown[:, 32:40] * 128 + 255 * 127) / 255)
    expected = viewers_view(tmp_path, shown.astype("uint8"))
    np.testing.assert_allclose(loaded(path), expected, atol=2 / 127.5)  # alpha's rounding


def test_a_file_pillow_cannot_open_is_refused_by_name_with_what_to_do(tmp_path):
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))  # a HEIC file's start
    with pytest.raises(ti.UserError) as refusal:
        ti.load_images([str(path)], SIZE)
    message = str(refusal.value)
    assert str(path) in message and "convert it to JPEG or PNG" in message
    assert "\n" not in message


def test_a_folder_of_heic_photos_is_not_taken_for_an_empty_folder(tmp_path):
    (tmp_path / "IMG_0001.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    assert ti.resolve_image_files([str(tmp_path)]) == [str(tmp_path / "IMG_0001.heic")]


def test_a_photo_smaller_than_the_resolution_is_used_with_a_one_line_warning(tmp_path, capsys):
    path = tmp_path / "small.png"
    Image.fromarray(upright_picture(48, 40), "RGB").save(path)
    image = ti.load_images([str(path)], SIZE)[0]
    assert image.shape == (SIZE, SIZE, 3)
    printed = capsys.readouterr().out
    assert printed.startswith(f"warning: {path} is 40 x 48 pixels") and "upscaled" in printed
    assert printed.count("\n") == 1
    Image.fromarray(upright_picture(), "RGB").save(path)  # 64 x 96: no warning
    ti.load_images([str(path)], SIZE)
    assert capsys.readouterr().out == ""
