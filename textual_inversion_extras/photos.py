"""Reading a photo as a viewer shows it: upright, in 8-bit RGB, in its own colours.

`keras.utils.load_img` hands over the pixels as the file stores them. A phone stores
them as the sensor read them and writes an EXIF orientation tag, which every viewer
applies: ignored, a portrait photo trains lying on its side. And Pillow's
`convert("RGB")` clips the values of 16- and 32-bit images instead of scaling them, so
a dark 16-bit PNG trains as a white square. `read_photo` does what a viewer does.
"""

import os

import numpy as np
from PIL import Image, ImageOps

from textual_inversion_extras.errors import UserError

# Transparent pixels are composited onto white, the background a picture with
# transparency is shown on in a browser, a document or a shop's page; Pillow's plain
# `convert("RGB")` would show whatever colour the transparent pixels happen to hold.
BACKGROUND = (255, 255, 255)

# Formats phones and cameras write that this Pillow may not open, and what to do.
CONVERT_ADVICE = (
    "convert it to JPEG or PNG (on a Mac: Preview, File > Export; on an iPhone: "
    "Settings > Camera > Formats > Most Compatible)"
)


def as_8_bit(image):
    """Images of more than 8 bits per channel, scaled to 0..255: 16-bit integers by
    their range (65,535), 32-bit integers by 65,535 when every value fits in 16 bits (as
    in a 16-bit PNG Pillow opens as 32-bit) and by their own range otherwise, and 32-bit
    floats as 0..1."""
    if image.mode.startswith("I;16"):
        values = np.asarray(image, dtype="float64") / 65535
    elif image.mode == "I":
        values = np.asarray(image, dtype="float64")
        values = values / (65535 if values.max(initial=0) <= 65535 else 2**31 - 1)
    elif image.mode == "F":
        values = np.asarray(image, dtype="float64")
    else:
        return image
    return Image.fromarray(np.round(np.clip(values, 0, 1) * 255).astype("uint8"), "L")


def as_rgb(image):
    """Any mode Pillow opens, as 8-bit RGB: transparency composited onto BACKGROUND,
    grayscale, palette and CMYK converted, high bit depths scaled (`as_8_bit`)."""
    image = as_8_bit(image)
    has_transparency = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_transparency:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_photo(path):
    """The picture in `path` as a viewer shows it: float32 [height, width, 3] in 0..255."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)  # upright, as the EXIF tag says
            return np.asarray(as_rgb(image), dtype="float32")
    except Image.UnidentifiedImageError:
        extension = os.path.splitext(path)[1].lower()
        if extension in Image.registered_extensions():
            raise UserError(
                f"Could not read the image {path}: it is not a {extension} picture (nor any "
                "other Pillow reads); replace it with a JPEG or PNG file, or remove it."
            ) from None
        raise UserError(
            f"Could not read the image {path}: this Pillow does not open "
            f"{extension or 'such'} files; {CONVERT_ADVICE}, or remove it."
        ) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise UserError(
            f"Could not read the image {path} ({error}); it may be damaged: open and save "
            "it again as JPEG or PNG, or remove it."
        ) from None


def warn_if_upscaled(path, photo, resolution):
    """One line when a photo's shorter side is below `resolution`: it is used, enlarged,
    and a blurred photo teaches a blurred concept."""
    height, width = photo.shape[:2]
    if min(height, width) < resolution:
        print(
            f"warning: {path} is {width} x {height} pixels, smaller than the {resolution} x "
            f"{resolution} it is used at: it is upscaled, which blurs it; a larger photo "
            "trains better."
        )
