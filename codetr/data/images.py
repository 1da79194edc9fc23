"""Image decoding to RGB uint8 (EXIF orientation, grayscale, alpha, 16-bit) and inference folders."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from codetr.errors import MissingInputError, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ImageDecodeError(UserError, OSError):
    """An image file exists but cannot be decoded; the message names the file."""


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """uint8 `[H, W, 3]` of any PIL mode; 16/32-bit integer pixels are scaled, not clipped."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # PIL's own convert("L") saturates everything above 255 to white; a 16-bit sensor image
        # must be scaled by 255/65535 instead.
        values = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        # Float images are assumed to be in [0, 1] (the usual convention for linear data).
        gray = np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    # RGBA/LA drop alpha (the colour under it is kept, as torchvision's read_image does).
    return np.array(image.convert("RGB"))  # a writable copy: torch.from_numpy needs one


def load_rgb(path: str | os.PathLike, apply_exif: bool = True) -> torch.Tensor:
    """Decodes an image in its displayed orientation (EXIF applied) as uint8 `[3, H, W]` RGB.

    `apply_exif=False` keeps the stored orientation (for annotations made in that frame, see
    `codetr.data.image_check.verify_images`).

    Raises:
        FileNotFoundError: the file is missing.
        ImageDecodeError: the file cannot be decoded (truncated, not an image, ...).
    """
    try:
        with Image.open(path) as image:
            image.load()
            if apply_exif:
                image = ImageOps.exif_transpose(image)
            array = _to_rgb_array(image)
    except FileNotFoundError:
        raise MissingInputError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"cannot decode image {path}: {err}") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def displayed_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image as displayed (EXIF rotation applied), from its header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise MissingInputError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"cannot decode image {path}: {err}") from None
    # EXIF orientations 5..8 rotate by 90 degrees, which swaps the displayed width and height.
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def list_images(root: str | os.PathLike, where: Optional[str] = None) -> list[Path]:
    """Image files under `root`, recursively, sorted by relative path.

    Symlinked folders are followed (each real folder once, so a link loop ends); hidden entries
    (names starting with '.', e.g. macOS `._x.jpg` forks, `..jpg`) are skipped with a warning
    that counts them, as are folders seen twice through links. `where` is the spec key that gave
    `root` (e.g. `dataset.infer_data_sources.image_dir`), named by the error when it is missing.
    """
    root = Path(root)
    if not root.is_dir():  # the spec key says what to fix, the path what was looked for
        raise MissingInputError(f"{where + ': ' if where else ''}image folder {root} does not exist "
                                "or is not a directory")
    found, hidden, seen, loops = [], [], set(), []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # reached again through a symlink: a loop or a duplicate
            loops.append(dirpath)
            dirnames[:] = []
            continue
        seen.add(real)
        hidden += [os.path.join(dirpath, d) for d in dirnames if d.startswith(".")]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            if name.startswith("."):
                hidden.append(os.path.join(dirpath, name))
            else:
                found.append(Path(dirpath) / name)
    if hidden:
        warnings.warn(f"{root}: skipped {len(hidden)} hidden entries (names starting with '.'), "
                      f"e.g. {', '.join(hidden[:3])}", stacklevel=2)
    if loops:
        warnings.warn(f"{root}: skipped {len(loops)} folders reached twice through symbolic "
                      f"links, e.g. {', '.join(loops[:3])}", stacklevel=2)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


# (image uint8 [3, H, W], boxes xyxy [N, 4], labels [N]) -> (image float [3, h, w], boxes, labels)
SampleTransform = Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                           tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class ImageFolderDataset(torch.utils.data.Dataset):
    """All images under one or more folders, for inference.

    Items are `(image, meta)`: `image` float32 `[3, h, w]` after `transforms` (normalised);
    `meta` = {"path": str, "relative_path": str (posix, relative to its folder), "root": str,
    "orig_size": int64 `[2]` (h, w) as displayed, "size": int64 `[2]` (h, w) after the transform}.
    """

    def __init__(self, image_dirs: str | Sequence[str], transforms: Optional[SampleTransform],
                 where: Optional[str] = None) -> None:
        """Lists the images now, so a missing folder fails before inference starts.

        Args:
            image_dirs: a folder or a list of folders, searched recursively.
            transforms: the eval transform (see `codetr.data.transforms.build_transforms`); None
                returns the image as float in [0, 1] without resizing or normalisation.
            where: the spec key that gave `image_dirs` (`dataset.infer_data_sources.image_dir`),
                named, with the list index, by the error of a missing folder.
        """
        single = isinstance(image_dirs, (str, os.PathLike))
        dirs = [image_dirs] if single else list(image_dirs)
        if not dirs:
            raise ValueError("no image folder given")
        self.transforms = transforms
        self.items: list[tuple[str, str]] = []  # (root, relative posix path)
        for i, root in enumerate(dirs):
            key = where if single or where is None else f"{where}[{i}]"
            self.items.extend((str(root), p.relative_to(root).as_posix()) for p in list_images(root, key))
        if not self.items:
            raise MissingInputError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {dirs}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        root, relative = self.items[index]
        path = os.path.join(root, relative)
        image = load_rgb(path)
        orig_size = torch.tensor(image.shape[-2:], dtype=torch.int64)
        if self.transforms is None:
            out = image.float() / 255.0
        else:
            out, _, _ = self.transforms(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
        meta = {"path": path, "relative_path": relative, "root": root, "orig_size": orig_size,
                "size": torch.tensor(out.shape[-2:], dtype=torch.int64)}
        return out, meta
