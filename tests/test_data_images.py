"""Image decoding (EXIF, grayscale, alpha, 16-bit, corrupt files) and inference image folders."""
import numpy as np
import pytest
import torch
from PIL import Image

from codetr.data.images import ImageDecodeError, ImageFolderDataset, displayed_size, list_images, load_rgb
from codetr.data.transforms import build_transforms
from codetr.spec.schema import AugmentationConfig


def chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def test_rgb_png_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    out = load_rgb(tmp_path / "a.png")
    assert out.dtype == torch.uint8 and out.shape == (3, 23, 31)
    assert torch.equal(out, chw(array))


@pytest.mark.parametrize("orientation, turns", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_applied(tmp_path, orientation, turns):
    rng = np.random.default_rng(orientation)
    array = rng.integers(0, 256, (20, 36, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(tmp_path / "r.png", exif=exif)
    out = load_rgb(tmp_path / "r.png")
    # Orientation 6 = rotate 90 degrees clockwise to display, 8 counter-clockwise, 3 by 180.
    assert torch.equal(out, chw(np.rot90(array, k=turns)))
    assert displayed_size(tmp_path / "r.png") == tuple(out.shape[-2:])


def test_grayscale_becomes_three_equal_channels(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (17, 19), dtype=np.uint8)
    Image.fromarray(array, mode="L").save(tmp_path / "g.png")
    out = load_rgb(tmp_path / "g.png")
    assert out.shape == (3, 17, 19)
    for c in range(3):
        assert torch.equal(out[c], torch.from_numpy(array))


def test_rgba_drops_alpha(tmp_path):
    array = np.random.default_rng(2).integers(0, 256, (15, 14, 4), dtype=np.uint8)
    Image.fromarray(array, mode="RGBA").save(tmp_path / "a.png")
    assert torch.equal(load_rgb(tmp_path / "a.png"), chw(array[:, :, :3]))


def test_16bit_is_scaled_not_saturated(tmp_path):
    array = np.random.default_rng(3).integers(0, 65536, (12, 21), dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "d.png")
    out = load_rgb(tmp_path / "d.png")
    expected = torch.from_numpy(np.rint(array / 257.0).astype(np.uint8))
    assert out.dtype == torch.uint8 and out.shape == (3, 12, 21)
    assert torch.equal(out[0], expected) and torch.equal(out[2], expected)
    assert int(out.max()) > 200 and int(out.min()) < 50  # a saturating convert gives all 255


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(np.random.default_rng(4).bytes(300))
    with pytest.raises(ImageDecodeError, match="junk.jpg"):
        load_rgb(tmp_path / "junk.jpg")
    array = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="cut.jpg"):
        load_rgb(tmp_path / "cut.jpg")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        load_rgb(tmp_path / "gone.png")


def make_folder(root):
    rng = np.random.default_rng(6)
    (root / "b" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for rel, size in [("z.png", (30, 40)), ("a.JPG", (25, 20)), ("b/deeper/c.png", (18, 44)),
                      (".hidden/x.png", (10, 10))]:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            root / rel, format="JPEG" if rel.endswith("JPG") else "PNG")
    (root / "notes.txt").write_text("not an image")


def test_image_folder_recursive_sorted_images_only(tmp_path):
    make_folder(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == [
        "a.JPG", "b/deeper/c.png", "z.png"]
    aug = AugmentationConfig(test_random_resize=32, random_resize_max_size=64)
    ds = ImageFolderDataset(str(tmp_path), build_transforms(aug, train=False))
    assert len(ds) == 3
    image, meta = ds[1]
    assert meta["relative_path"] == "b/deeper/c.png" and meta["path"].endswith("c.png")
    assert meta["orig_size"].tolist() == [18, 44]
    # Shorter side 18 -> 32 would make the longer 78 > 64, so the longer side is capped at 64.
    assert meta["size"].tolist() == list(image.shape[-2:]) == [26, 64]
    fixed = ImageFolderDataset([str(tmp_path), str(tmp_path / "b")],
                               build_transforms(aug, train=False, input_size=(48, 40)))
    assert len(fixed) == 4 and fixed[3][0].shape == (3, 48, 40)
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataset(str(tmp_path / "nope"), None)
