"""The one image decoder: JPEG and PNG only (no other format, no Ghostscript), turned upright by EXIF."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from bin_counter.core import abid


def encoded(fmt: str, size=(16, 12), **save) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, name", [("TIFF", "TIFF"), ("WEBP", "WebP"), ("BMP", "BMP"), ("ICO", "ICO"),
                                       ("GIF", "GIF")])
def test_image_formats_other_than_jpeg_and_png_are_refused_before_decoding(fmt, name, tmp_path):
    from PIL import features

    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow cannot write WebP")
    data = encoded(fmt)
    (tmp_path / "x.img").write_bytes(data)
    for source in (data, tmp_path / "x.img"):
        with pytest.raises(ValueError, match=f"^image format {name} is not accepted \\(only JPEG and PNG\\)$"):
            abid.read_image(source)
    assert abid.read_image(encoded("PNG")).size == (16, 12) and abid.read_image(encoded("JPEG")).size == (16, 12)


def test_eps_file_is_refused_without_running_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin

    calls = []

    def ghostscript(*args, **kwargs):  # what PIL would run to rasterise PostScript
        calls.append(args)
        raise OSError("Ghostscript was started")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    eps = encoded("EPS")
    assert eps.startswith(b"%!PS")
    with pytest.raises(ValueError, match="image format EPS is not accepted"):
        abid.read_image(eps)
    assert calls == []


def test_sideways_photo_is_turned_upright_by_its_exif_orientation():
    image = Image.new("RGB", (40, 20), "red")
    image.paste((0, 0, 255), (20, 0, 40, 20))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    upright = abid.read_image(buffer.getvalue())
    assert upright.size == (20, 40)
    red, blue = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert red[0] > 200 > red[2] and blue[2] > 200 > blue[0]  # the left (red) half is now on top
