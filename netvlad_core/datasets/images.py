"""Torch datasets over image files: decode (the one decoder for the model's input), resize to the model's input
size, normalise; and DataLoaders whose user errors reach the caller as one line, also from worker processes."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import NetVLADError

# Modes whose samples are wider than 8 bits: scaled to 0..255 by _high_bit_depth_to_8bit, never clipped.
_HIGH_BIT_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Modes with an alpha band (premultiplied ones included); convert("RGBA") un-premultiplies.
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_INT32_MAX = 2 ** 31 - 1


def _high_bit_depth_to_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    """The (H, W) uint8 version of the samples ``a`` of a 16-bit, 32-bit int or float image, by scaling (see
    :func:`load_image`)."""
    if mode == "F":
        a = a.astype(np.float64)
        finite = a[np.isfinite(a)]
        peak = 1.0 if finite.size == 0 or finite.max() <= 1.0 else 255.0
        a = np.nan_to_num(a, nan=0.0, posinf=peak, neginf=0.0)
        return np.clip(np.floor(a * (255.0 / peak) + 0.5), 0, 255).astype(np.uint8)
    a = np.maximum(a.astype(np.int64), 0)
    if mode != "I" or a.size == 0 or a.max() <= 65535:  # 16-bit range: round(v / 257) (never a tie: 257 is odd)
        return ((a + 128) // 257).astype(np.uint8)
    return ((a * 255 + _INT32_MAX // 2) // _INT32_MAX).astype(np.uint8)  # round(v · 255 / (2^31 − 1))


def _composite(rgba: np.ndarray, background: Sequence[int]) -> np.ndarray:
    """(H, W, 4) uint8 over the colour ``background``: round((rgb·a + bg·(255 − a)) / 255), (H, W, 3) uint8."""
    alpha = rgba[..., 3:].astype(np.uint32)
    if alpha.size == 0 or alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    bg = np.asarray(background, dtype=np.uint32)
    return ((rgba[..., :3].astype(np.uint32) * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8)


def _to_rgb8(im, background: Sequence[int]):
    """``im`` (any mode, already upright) as an 8-bit RGB image; transparency composited over ``background``."""
    from PIL import Image

    transparency = im.info.get("transparency")
    if im.mode in _HIGH_BIT_DEPTH:
        samples = np.asarray(im)
        grey = _high_bit_depth_to_8bit(samples, im.mode)
        if im.mode == "F" or not isinstance(transparency, int):
            return Image.fromarray(grey, "L").convert("RGB")
        rgba = np.repeat(grey[..., None], 4, axis=2)  # a 16-bit grey PNG's transparent grey level (tRNS)
        rgba[..., 3] = np.where(samples == transparency, 0, 255)
        return Image.fromarray(_composite(rgba, background), "RGB")
    if im.mode in _ALPHA or (im.mode in ("P", "L", "1", "RGB") and transparency is not None):
        return Image.fromarray(_composite(np.asarray(im.convert("RGBA")), background), "RGB")
    return im.convert("RGB")  # 1, L, P, RGB, RGBX, CMYK, YCbCr: Pillow's conversions


def load_image(path: Path, height: int, width: int, mean: Sequence[float], std: Sequence[float], *,
               min_side: int = 1) -> torch.Tensor:
    """Decode ``path`` to a (3, height, width) float tensor normalised with ``mean``/``std``.

    The one decoder every stage uses for the model's input:

    * the EXIF orientation is applied first (a phone photo stored sideways decodes upright);
    * everything is decoded to 8-bit RGB, then resized (bilinear) to ``width`` × ``height``. High bit depths are
      *scaled*, never clipped: 16-bit (``I;16``, ``I;16B``, ``I;16L``) as round(v / 257), so a 16-bit image gives
      exactly the tensor of its 8-bit version round(v / 257); 32-bit int (``I``) the same when all values fit
      in 0..65535, else as round(v · 255 / (2³¹ − 1)) (the int32 range), negatives as 0; float (``F``) as the
      range 0..1 when its finite maximum is ≤ 1, else 0..255, clipped, NaN as 0. Single-band images become grey
      RGB;
    * alpha (``RGBA``, ``LA``, ``PA``; palette, bilevel, grey, 16-bit grey or RGB images with a transparent
      colour) is composited over the normalisation mean colour round(255 · ``mean``), so transparent pixels
      normalise to (about) 0, the neutral input; fully opaque images keep their colours. CMYK, bilevel and palette
      images use Pillow's conversions;
    * images with a side shorter than ``min_side`` pixels (pass the backbone's stride) are refused.

    Unreadable, corrupt, too small or too large files (over twice Pillow's ``Image.MAX_IMAGE_PIXELS``, its
    decompression-bomb limit; between once and twice Pillow only warns) raise :class:`NetVLADError` naming the file.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            ImageOps.exif_transpose(im, in_place=True)  # loads the pixels; a no-op without an Orientation tag
            if min(im.size) < min_side:
                raise NetVLADError(f"{path}: image is {im.size[0]}×{im.size[1]} pixels, too small for the model: "
                                   f"both sides must be at least its stride of {min_side} pixels")
            im = _to_rgb8(im, [min(255, max(0, round(255 * float(m)))) for m in mean])
            if im.size != (width, height):
                im = im.resize((width, height), Image.BILINEAR)
            chw = np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1))  # uint8, one plane per channel
    except FileNotFoundError:
        raise NetVLADError(f"{path}: image not found") from None
    except Image.DecompressionBombError as e:
        raise NetVLADError(f"{path}: image too large to decode ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise NetVLADError(f"{path}: cannot decode image ({e})") from None
    # (x / 255 − mean) / std in float32, in place on contiguous planes: the same values as the out-of-place
    # expression, in half the time (it was 4/5 of the decode cost at 320×240)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return torch.from_numpy(chw).float().div_(255.0).sub_(m).div_(s)


class ImageFiles(Dataset):
    """Items are ``(image_tensor, index)`` for the given files, in order (``min_side``: see :func:`load_image`)."""

    def __init__(self, files: Sequence[Path], height: int, width: int,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225), *,
                 min_side: int = 1):
        self.files = [Path(f) for f in files]
        self.height, self.width = int(height), int(width)
        self.mean, self.std = tuple(mean), tuple(std)
        self.min_side = int(min_side)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return load_image(self.files[i], self.height, self.width, self.mean, self.std, min_side=self.min_side), i


# ------------------------------------------------------------------------------- loaders with clean user errors
#
# A DataLoader worker that raises re-raises in the main process as ``exc_type(<multi-line text with the worker's
# traceback>)``, so a corrupt image would reach the user as "Caught NetVLADError in DataLoader worker process 0 …".
# Instead the dataset's NetVLADError travels as data (_Failed) and CheckedLoader raises it as it was, in the
# caller's process, with or without workers. Other exceptions (bugs) keep PyTorch's handling.

class _Failed:
    """The :class:`NetVLADError` raised while loading an item (or the first one of a batch)."""

    def __init__(self, error: NetVLADError):
        self.error = error


class _Guarded(Dataset):
    """``dataset[i]``, or :class:`_Failed` where that raises :class:`NetVLADError`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except NetVLADError as e:
            return _Failed(e)


class _CollateOrFail:
    """The collate function, unless an item failed: then the first failure, in item order."""

    def __init__(self, collate, batched: bool):
        self.collate, self.batched = collate, batched

    def __call__(self, items):
        for item in (items if self.batched else [items]):
            if isinstance(item, _Failed):
                return item
        return self.collate(items)


class CheckedLoader:
    """Iterates a DataLoader over a guarded dataset; an item's :class:`NetVLADError` is raised here, unchanged
    (one line naming the file), also when it happened in a worker process."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        try:
            for batch in batches:
                if isinstance(batch, _Failed):
                    raise batch.error
                yield batch
        finally:
            del batches  # stops the worker processes now, not when the error's traceback is freed


def checked_loader(dataset: Dataset, *, batch_size: int | None, **loader_args) -> CheckedLoader:
    """``DataLoader(dataset, batch_size=batch_size, **loader_args)`` whose iteration raises a dataset's
    :class:`NetVLADError` as it is, with any number of workers (see :class:`CheckedLoader`)."""
    from torch.utils.data import default_collate, default_convert

    collate = loader_args.pop("collate_fn", None) or (default_convert if batch_size is None else default_collate)
    return CheckedLoader(DataLoader(_Guarded(dataset), batch_size=batch_size,
                                    collate_fn=_CollateOrFail(collate, batched=batch_size is not None),
                                    **loader_args))
