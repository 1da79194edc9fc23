"""`dataset.augmentation.train_padding: lsj`: mmdet's LSJ train `Pad(1024, 114)` (canvas = image)."""
import torch
from torchvision.ops import box_convert

from codetr.data.build import build_collator
from codetr.data.collate import Collator
from codetr.data.test_padding import LSJTrainCollator, lsj_pad_values
from codetr.spec.load import spec_from_dict


def _spec(train_padding: str):
    return spec_from_dict({"dataset": {"augmentation": {
        "train_padding": train_padding, "fixed_random_crop": 64, "random_resize_max_size": 64,
        "pad_size_divisor": 32, "input_mean": [0.4, 0.5, 0.6], "input_std": [0.2, 0.25, 0.3]}}})


def _sample(h, w, n, gen):
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w / 2, h / 2])
    wh = torch.rand(n, 2, generator=gen) * torch.tensor([w / 2, h / 2]) + 1
    pixels = torch.cat([xy, xy + wh], 1)  # xyxy in the image's pixels
    boxes = box_convert(pixels, "xyxy", "cxcywh") / torch.tensor([w, h, w, h])
    target = {"boxes": boxes, "labels": torch.zeros(n, dtype=torch.long), "size": torch.tensor([h, w]),
              "orig_size": torch.tensor([2 * h, 2 * w])}
    return (torch.randn(3, h, w, generator=gen), target), pixels


def test_the_canvas_is_the_image_and_the_targets_are_in_its_frame():
    spec = _spec("lsj")
    collate = build_collator(spec, "train")
    assert isinstance(collate, LSJTrainCollator)
    assert type(build_collator(_spec("mask"), "train")) is Collator
    gen = torch.Generator().manual_seed(7)
    (s0, p0), (s1, p1) = _sample(40, 64, 3, gen), _sample(64, 20, 2, gen)
    batch = collate([s0, s1])
    assert batch.images.shape == (2, 3, 64, 64) and not batch.masks.any()
    values = lsj_pad_values([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    torch.testing.assert_close(batch.images[0, :, 40:, :], values[:, None, None].expand(3, 24, 64))
    torch.testing.assert_close(batch.images[1, :, :, 20:], values[:, None, None].expand(3, 64, 44))
    assert torch.equal(batch.images[0, :, :40, :], s0[0])
    for target, pixels, orig in zip(batch.targets, (p0, p1), (s0[1], s1[1])):
        assert target["size"].tolist() == [64, 64] and target["pad_size"] == (64, 64)
        back = box_convert(target["boxes"] * 64, "cxcywh", "xyxy")  # canvas-normalised -> pixels
        torch.testing.assert_close(back, pixels, rtol=0, atol=1e-4)  # float32 round trip
        assert torch.equal(target["orig_size"], orig["orig_size"]) and torch.equal(target["labels"], orig["labels"])
