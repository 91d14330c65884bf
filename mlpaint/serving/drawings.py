"""A request's digit as the model's input: 784 MNIST-like pixels, and whether anything was
drawn. A drawing (a data URL) goes through the same preprocessing as training's "as drawn"
augmentation (mlpaint.images.preprocess), so serving sees what training saw."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool

from mlpaint.data.pins import IMAGE_SIDE, N_FEATURES
from mlpaint.images.preprocess import ink_from_image, something_drawn, to_mnist
from mlpaint.serving.schemas import DigitInput

MAX_IMAGE_SIDE = 4096
# A drawing of up to this many pixels (the page's canvas: 280x280) decodes in milliseconds. It
# is decoded on the event loop, as scoring is: under load, handing it to a thread cost more,
# with a dozen threads queueing for the GIL after each step (bench/feedback.py). Larger
# images, and batches, go to a worker thread.
INLINE_DECODE_PIXELS = 512 * 512


def drawing_bytes(data_url: str) -> tuple[str, bytes]:
    """(media type, bytes) of an image data URL, as the client sent it."""
    header, sep, payload = data_url.partition(",")
    if not sep or not header.startswith("data:image/") or ";base64" not in header:
        raise HTTPException(400, "image must be a data URL: data:image/png;base64,<data>")
    try:
        return header[len("data:"):].split(";", 1)[0], base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPException(400, f"image is not valid base64: {exc}") from exc


@contextmanager
def _opened_drawing(raw: bytes) -> Iterator:
    """The drawing as a PIL image, its header read and its size checked but nothing decoded
    yet. Failing to read it, here or while the block decodes it, is a 400."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            if max(image.size) > MAX_IMAGE_SIDE:
                raise HTTPException(400, f"image larger than {MAX_IMAGE_SIDE} px a side")
            yield image
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise HTTPException(400, "image could not be decoded as PNG, JPEG or another format "
                                 "Pillow reads") from exc


def _digit_of_image(image) -> tuple[np.ndarray, bool]:
    image.load()
    ink = ink_from_image(image)
    return to_mnist(ink), something_drawn(ink)


def digit_of_drawing(raw: bytes) -> tuple[np.ndarray, bool]:
    """The 28x28 digit of an encoded drawing, and whether anything was drawn."""
    with _opened_drawing(raw) as image:
        return _digit_of_image(image)


async def digit_of_drawing_soon(raw: bytes) -> tuple[np.ndarray, bool]:
    """`digit_of_drawing`, on the event loop for a canvas-sized drawing, else on a thread."""
    with _opened_drawing(raw) as image:
        if image.width * image.height <= INLINE_DECODE_PIXELS:
            return _digit_of_image(image)
        return await run_in_threadpool(_digit_of_image, image)


def decode_image(data_url: str) -> tuple[np.ndarray, bool]:
    return digit_of_drawing(drawing_bytes(data_url)[1])


def pixels_of(item: DigitInput) -> tuple[np.ndarray, bool]:
    """The 784 MNIST-like pixels of one input, and whether anything was drawn."""
    if item.pixels is not None:
        pixels = np.rint(np.asarray(item.pixels, dtype=np.float64)).astype(np.uint8)
        return pixels, something_drawn(pixels.reshape(IMAGE_SIDE, IMAGE_SIDE) / 255.0)
    digit, drawn = decode_image(item.image)
    return digit.reshape(N_FEATURES), drawn


async def pixels_of_all(items: list[DigitInput]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, 784) uint8 and a bool per row: was anything drawn. Pixel lists, microseconds
    of work, and one canvas-sized drawing are read on the event loop; a large drawing, or a
    batch holding drawings, on a worker thread."""
    if len(items) == 1 and items[0].image is not None:
        digit, drawn = await digit_of_drawing_soon(drawing_bytes(items[0].image)[1])
        return digit.reshape(1, N_FEATURES), np.array([drawn])

    def decode_all() -> tuple[np.ndarray, np.ndarray]:
        decoded = [pixels_of(item) for item in items]
        return (np.stack([pixels for pixels, _ in decoded]),
                np.array([drawn for _, drawn in decoded]))

    if all(item.image is None for item in items):
        return decode_all()
    return await run_in_threadpool(decode_all)
