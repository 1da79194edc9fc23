"""`fixed_padding`: TAO's FixedPad, each image to (short, long) by its orientation, then the batch max."""
import pytest
import torch

from codetr.data.build import build_collator
from codetr.data.fixed_padding import OrientedPadCollator
from codetr.data.transforms import boxes_to_target, build_transforms
from codetr.spec import SpecError
from codetr.spec.schema import ExperimentSpec


def spec_with(**aug) -> ExperimentSpec:
    spec = ExperimentSpec()
    for key, value in aug.items():
        setattr(spec.dataset.augmentation, key, value)
    return spec


def random_aug() -> dict:
    """Small random sizes with max(scales) <= random_resize_max_size, as TAO's specs have them."""
    max_size = int(torch.randint(60, 140, ()))
    scales = sorted({int(s) for s in torch.randint(24, max_size + 1, (3,))})
    crop_min = int(torch.randint(16, 40, ()))
    return dict(scales=scales, train_random_resize=[int(torch.randint(30, 90, ()))],
                train_random_crop_min=crop_min, train_random_crop_max=crop_min + int(torch.randint(0, 30, ())),
                random_resize_max_size=max_size, test_random_resize=int(torch.randint(24, max_size + 1, ())),
                pad_size_divisor=int(torch.randint(1, 17, ())), input_mean=[0.0], input_std=[1.0])


def random_hw(orientation: str) -> tuple[int, int]:
    """A random size of that orientation, up to 1:6 aspect ratios and exact squares."""
    short = int(torch.randint(8, 120, ()))
    long = short + int(torch.randint(0, 5 * short, ()))
    return (long + 1, short) if orientation == "portrait" else (short, long)


def round_up(value: int, divisor: int) -> int:
    return (value + divisor - 1) // divisor * divisor


def transformed(aug, train: bool, sizes) -> list:
    """(image, target) samples as the datasets give them, plus each one's pixel boxes."""
    transform = build_transforms(aug, train)
    samples, pixel_boxes = [], []
    for h, w in sizes:
        boxes = torch.sort(torch.rand(3, 2, 2) * torch.tensor([w, h]), dim=1).values.reshape(3, 4)
        boxes = boxes + torch.tensor([0.0, 0.0, 1.0, 1.0])
        image, out, labels = transform(torch.randint(0, 256, (3, h, w), dtype=torch.uint8),
                                       boxes.clamp(max=torch.tensor([w, h, w, h]).float()), torch.arange(3))
        size = tuple(image.shape[-2:])
        samples.append((image, {"boxes": boxes_to_target(out, size), "labels": labels,
                                "size": torch.tensor(size), "orig_size": torch.tensor([h, w])}))
        pixel_boxes.append(out)
    return samples, pixel_boxes


@pytest.mark.parametrize("train", [True, False])
def test_transforms_never_exceed_the_orientation_bound(train):
    aug = spec_with(**random_aug()).dataset.augmentation
    short = max(aug.scales) if train else aug.test_random_resize
    for _ in range(40):
        h, w = random_hw("portrait" if torch.rand(()) < 0.5 else "landscape")
        samples, _ = transformed(aug, train, [(h, w)])
        oh, ow = samples[0][0].shape[-2:]
        assert min(oh, ow) <= short and max(oh, ow) <= aug.random_resize_max_size, (h, w, oh, ow)
        if not train:  # the eval resize keeps the orientation (a train crop need not)
            assert (oh > ow) == (h > w)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("mix", ["landscape", "portrait", "both"])
def test_batch_shape_is_tao_rule_and_content_unchanged(train, mix):
    spec = spec_with(**random_aug())
    aug = spec.dataset.augmentation
    short, long = (max(aug.scales) if train else aug.test_random_resize), aug.random_resize_max_size
    kinds = ["landscape", "portrait"] if mix == "both" else [mix, mix]
    kinds += [kinds[int(torch.randint(0, 2, ()))] for _ in range(int(torch.randint(0, 3, ())))]
    samples, pixel_boxes = transformed(aug, train, [random_hw(k) for k in kinds])
    portrait = [s[0].shape[-2] > s[0].shape[-1] for s in samples]
    height = max(long if p else short for p in portrait)
    width = max(short if p else long for p in portrait)
    expected = (round_up(height, aug.pad_size_divisor), round_up(width, aug.pad_size_divisor))
    collator = build_collator(spec, "train" if train else "val")
    batch = collator(samples)
    assert tuple(batch.images.shape[-2:]) == expected
    images = collator.images([(s[0], {"size": s[1]["size"]}) for s in samples]).images
    assert torch.equal(images, batch.images)
    for i, (image, target) in enumerate(samples):
        h, w = image.shape[-2:]
        assert torch.equal(batch.images[i, :, :h, :w], image) and batch.images[i, :, h:].abs().sum() == 0
        assert not batch.masks[i, :h, :w].any() and batch.masks[i].sum() == expected[0] * expected[1] - h * w
        scale = batch.targets[i]["size"].flip(0).repeat(2).float()  # boxes in the image's pixels
        cxcywh = batch.targets[i]["boxes"] * scale
        xyxy = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1)
        assert torch.allclose(xyxy, pixel_boxes[i], atol=1e-3)


def test_defaults_pad_one_orientation_to_800_by_1333_not_a_square():
    spec = spec_with()  # fixed_padding: true, 800 / 1333, divisor 32
    landscape = [(torch.zeros(3, 800, int(torch.randint(801, 1334, ()))), {"size": torch.tensor([800, 1000])})]
    portrait = [(torch.zeros(3, int(torch.randint(801, 1334, ())), 600), {"size": torch.tensor([1000, 600])})]
    val = build_collator(spec, "val")
    assert val.images(landscape * 2).images.shape[-2:] == (800, 1344)
    assert val.images(portrait * 2).images.shape[-2:] == (1344, 800)
    assert val.images(landscape + portrait).images.shape[-2:] == (1344, 1344)


def test_image_over_its_bound_names_the_keys():
    short, long = int(torch.randint(20, 50, ())), int(torch.randint(60, 90, ()))
    collator = OrientedPadCollator(short, long, 1, "dataset.augmentation.test_random_resize")
    h = short + int(torch.randint(1, 10, ()))  # landscape, too high
    with pytest.raises(SpecError, match=rf"{h}x{long} does not fit the fixed padding {short}x{long} "
                                        r"\(dataset.augmentation.test_random_resize"):
        collator.images([(torch.zeros(3, h, long), {})])
    with pytest.raises(ValueError, match="positive"):
        OrientedPadCollator(0, long)


def test_lsj_train_and_explicit_eval_size_keep_one_shape():
    crop = 32 * int(torch.randint(2, 5, ()))
    spec = spec_with(fixed_random_crop=crop, pad_size_divisor=32)
    assert build_collator(spec, "train").fixed_size == (crop, crop)
    size = (int(torch.randint(20, 60, ())), int(torch.randint(20, 60, ())))
    assert build_collator(spec, "val", size).fixed_size == size
    assert build_collator(spec, "test", size).fixed_size == size
