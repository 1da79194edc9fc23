"""Collate/padding, spec -> label map/datasets/dataloaders, and the real coco128 photos."""
import json

import pytest
import torch

from codetr.data.build import (build_collator, build_dataloader, build_dataset, build_infer_dataset,
                               build_label_map, load_split_sources)
from codetr.data.classmap import read_classmap
from codetr.data.collate import Collator, collate_fn
from codetr.data.labels import LabelMap
from codetr.spec import SpecError
from codetr.spec.schema import DataSource, ExperimentSpec, InferDataSource
from data_fixtures import make_coco


def small_spec(sources, contiguous=False, num_classes=8, **aug) -> ExperimentSpec:
    spec = ExperimentSpec()
    ds = spec.dataset
    ds.train_data_sources = [DataSource(str(d), str(j)) for j, d in sources]
    ds.val_data_sources = [DataSource(str(d), str(j)) for j, d in sources[:1]]
    ds.contiguous_labels, ds.num_classes = contiguous, num_classes
    a = ds.augmentation
    a.scales, a.train_random_resize = [48, 64], [40, 56]
    a.train_random_crop_min, a.train_random_crop_max = 32, 48
    a.random_resize_max_size, a.test_random_resize = 96, 56
    for k, v in aug.items():
        setattr(a, k, v)
    return spec


def check_batch(batch, batch_size: int, num_classes: int) -> None:
    """The data contract of docs/DESIGN.md."""
    b, c, h, w = batch.images.shape
    assert (b, c) == (batch_size, 3) and batch.images.dtype == torch.float32
    assert batch.masks.shape == (b, h, w) and batch.masks.dtype == torch.bool
    assert len(batch.targets) == b
    for i, t in enumerate(batch.targets):
        sh, sw = t["size"].tolist()
        assert not batch.masks[i, :sh, :sw].any() and batch.masks[i].sum() == h * w - sh * sw
        assert (batch.images[i, :, sh:, :] == 0).all() and (batch.images[i, :, :, sw:] == 0).all()
        assert t["boxes"].dtype == torch.float32 and t["boxes"].shape[1:] == (4,)
        assert t["labels"].dtype == torch.int64 and t["labels"].shape == t["boxes"].shape[:1]
        assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
        assert ((t["labels"] >= 0) & (t["labels"] < num_classes)).all()
        assert t["orig_size"].dtype == torch.int64 and t["orig_size"].shape == (2,)


def test_collate_pads_to_divisor_or_fixed():
    g = torch.Generator().manual_seed(0)
    samples = [(torch.randn(3, h, w, generator=g), {"size": torch.tensor([h, w])})
               for h, w in [(30, 41), (17, 50), (33, 20)]]
    batch = collate_fn(samples, pad_size_divisor=16)
    assert batch.images.shape == (3, 3, 48, 64) and len(batch) == 3
    for i, (image, _) in enumerate(samples):
        h, w = image.shape[-2:]
        assert torch.equal(batch.images[i, :, :h, :w], image)
        assert batch.images[i, :, h:].abs().sum() == 0 and batch.images[i, :, :, w:].abs().sum() == 0
        assert batch.masks[i].sum() == 48 * 64 - h * w and not batch.masks[i, :h, :w].any()
    assert Collator(32, (60, 70))(samples).images.shape[-2:] == (64, 96)
    with pytest.raises(ValueError, match="does not fit the fixed padding size 20x70"):
        Collator(1, (20, 70))(samples)
    moved = batch.to("cpu")
    assert torch.equal(moved.images, batch.images) and moved.targets[0]["size"].tolist() == [30, 41]


def test_label_map_from_spec_and_checkpoint(tmp_path):
    sources = [make_coco(tmp_path / "a", seed=31)]
    assert build_label_map(small_spec(sources)).category_ids == (1, 3, 7)
    with pytest.raises(SpecError, match="set dataset.num_classes=3"):
        build_label_map(small_spec(sources, contiguous=True, num_classes=5))
    with pytest.raises(SpecError, match="set dataset.num_classes=8"):
        build_label_map(small_spec(sources, num_classes=7))
    saved = LabelMap((2, 4), ("x", "y"), True, 2).to_dict()
    assert build_label_map(small_spec(sources), checkpoint_label_map=saved).names == ("x", "y")


def test_category_name_conflict_across_sources(tmp_path):
    first = make_coco(tmp_path / "a", seed=32)
    second = make_coco(tmp_path / "b", seed=33, categories=[{"id": 3, "name": "wolf"}])
    with pytest.raises(ValueError, match=r"category id 3 is 'dog' in .* but 'wolf' in"):
        build_label_map(small_spec([first, second]))


def test_one_category_name_with_two_ids_across_sources(tmp_path):
    name = ["cat", "dog", "zebra"][int(torch.randint(0, 3, ()))]
    ids = torch.randperm(20)[:2] + 1
    first = make_coco(tmp_path / "a", seed=38, categories=[{"id": int(ids[0]), "name": name}])
    second = make_coco(tmp_path / "b", seed=39, categories=[{"id": int(ids[1]), "name": name}])
    with pytest.raises(ValueError, match=rf"category '{name}' is id {int(ids[0])} in {first[0]} but id "
                                         rf"{int(ids[1])} in {second[0]}; names must be unique"):
        build_label_map(small_spec([first, second], num_classes=30))
    same = make_coco(tmp_path / "c", seed=40, categories=[{"id": int(ids[0]), "name": name}])
    assert build_label_map(small_spec([first, same], num_classes=30)).names == (name,)


def test_half_given_source_names_its_key(tmp_path):
    sources = [make_coco(tmp_path / "a", n_images=1, seed=41)]
    spec = small_spec(sources)
    spec.dataset.val_data_sources = [DataSource(), DataSource(image_dir=str(tmp_path / "a" / "images"))]
    with pytest.raises(SpecError, match=r"dataset.val_data_sources\[1\] needs both image_dir and "
                                        r"json_file \(image_dir='.*/a/images', json_file=''\)"):
        load_split_sources(spec, "val")


@pytest.mark.parametrize("dataset_type", ["serialized", "default"])
def test_train_dataloader_contract_with_worker(tmp_path, dataset_type):
    sources = [make_coco(tmp_path / "a", n_images=4, seed=34), make_coco(tmp_path / "b", n_images=3, seed=35)]
    spec = small_spec(sources)
    spec.dataset.dataset_type = dataset_type
    loaded = load_split_sources(spec, "train")
    label_map = build_label_map(spec, train_sources=loaded)
    train = build_dataset(spec, "train", label_map, sources=loaded)
    assert len(train) == 7
    collator = build_collator(spec, "train")
    loader = build_dataloader(train, batch_size=3, workers=1 if dataset_type == "serialized" else 0,
                              shuffle=True, collate_fn=collator, seed=0)
    batches = list(loader)
    assert [len(b) for b in batches] == [3, 3, 1]
    for b in batches:  # fixed_padding: (max(scales), max_size) = (64, 96) by orientation, batch max
        portrait = [t["size"][0] > t["size"][1] for t in b.targets]
        assert b.images.shape[-2:] == (96 if any(portrait) else 64, 96 if not all(portrait) else 64)
        check_batch(b, len(b), label_map.num_classes)
    assert sorted(t["image_id"] for b in batches for t in b.targets) == [1, 1, 2, 2, 3, 3, 4]


def test_eval_and_infer_padding(tmp_path):
    sources = [make_coco(tmp_path / "a", n_images=3, seed=36)]
    spec = small_spec(sources, fixed_padding=False, pad_size_divisor=32)
    label_map = build_label_map(spec)
    val = build_dataset(spec, "val", label_map)
    batch = next(iter(build_dataloader(val, 3, 0, False, build_collator(spec, "val"))))
    assert batch.images.shape[-1] % 32 == 0 and batch.images.shape[-2] % 32 == 0
    assert min(batch.targets[0]["size"].tolist()) == 56 or max(batch.targets[0]["size"].tolist()) == 96
    fixed = build_dataset(spec, "val", label_map, input_size=(40, 50))
    fixed_batch = build_collator(spec, "val", input_size=(40, 50))([fixed[0], fixed[1]])
    assert fixed_batch.images.shape[-2:] == (64, 64)
    spec.dataset.infer_data_sources = InferDataSource(image_dir=str(sources[0][1]))
    infer = build_infer_dataset(spec, input_size=(40, 50))
    image_batch = build_collator(spec, "test", (40, 50)).images([infer[0], infer[2]])
    assert image_batch.images.shape == (2, 3, 64, 64) and image_batch.metas[1]["size"].tolist() == [40, 50]
    with pytest.raises(SpecError, match="test_data_sources is empty"):
        build_dataset(spec, "test", label_map)


def test_lsj_train_batches_have_one_shape(tmp_path):
    sources = [make_coco(tmp_path / "a", n_images=4, seed=37)]
    spec = small_spec(sources, fixed_random_crop=64, fixed_padding=False)
    train = build_dataset(spec, "train", build_label_map(spec))
    loader = build_dataloader(train, 2, 0, True, build_collator(spec, "train"), seed=1)
    assert {tuple(b.images.shape) for b in loader} == {(2, 3, 64, 64)}


@pytest.mark.parametrize("contiguous, num_classes", [(True, 80), (False, 91)])
def test_coco128_labels_round_trip_and_batch(coco128, contiguous, num_classes):
    json_file, image_dir = coco128 / "annotations" / "instances.json", coco128 / "images"
    spec = small_spec([(json_file, image_dir)], contiguous=contiguous, num_classes=num_classes)
    spec.dataset.train_data_sources = spec.dataset.val_data_sources
    label_map = build_label_map(spec)
    coco = json.loads(json_file.read_text())
    ids = sorted(c["id"] for c in coco["categories"])
    assert label_map.category_ids == tuple(ids) and max(ids) == 90 and len(ids) == 80
    assert list(label_map.names) == read_classmap(coco128 / "classmap.txt")
    with pytest.raises(SpecError, match=f"set dataset.num_classes={num_classes}"):
        build_label_map(small_spec([(json_file, image_dir)], contiguous, 85))
    val = build_dataset(spec, "val", label_map)
    by_image = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["category_id"])
    for i in (0, 5, 17):
        image_id = val.record(i).image_id
        labels = val[i][1]["labels"].tolist()
        assert [label_map.category_id(x) for x in labels] == by_image.get(image_id, [])
        if not contiguous:
            assert labels == by_image.get(image_id, [])
    batch = next(iter(build_dataloader(val, 4, 0, False, build_collator(spec, "val"))))
    portrait = [t["size"][0] > t["size"][1] for t in batch.targets]  # eval bound (56, 96) -> 64 x 96
    assert batch.images.shape == (4, 3, 96 if any(portrait) else 64, 64 if all(portrait) else 96)
    check_batch(batch, 4, num_classes)
