"""CoDETRDataModule: which splits it builds, and the train loader dropping its last partial batch."""
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import BatchSampler, DataLoader

from codetr.data.build import build_label_map
from codetr.spec import SpecError
from codetr.spec.schema import DataSource, ExperimentSpec
from codetr.tasks.datamodule import CoDETRDataModule, check_one_train_batch
from data_fixtures import make_coco


def module(tmp_path, n_train: int, batch_size: int, val=None) -> CoDETRDataModule:
    json_file, image_dir = make_coco(tmp_path / "train", n_images=n_train, seed=int(torch.randint(0, 99, ())))
    spec = ExperimentSpec()
    ds = spec.dataset
    ds.train_data_sources = [DataSource(str(image_dir), str(json_file))]
    ds.val_data_sources = [DataSource(str(image_dir), str(json_file))] if val is None else val
    ds.test_data_sources = DataSource(str(image_dir), str(json_file))
    ds.batch_size, ds.workers, ds.num_classes = batch_size, 0, 8
    a = ds.augmentation
    a.scales, a.train_random_resize, a.random_resize_max_size, a.test_random_resize = [48], [40], 64, 48
    a.train_random_crop_min, a.train_random_crop_max = 24, 32
    return CoDETRDataModule(spec, build_label_map(spec))


@pytest.mark.parametrize("given", ["image_dir", "json_file"])
def test_a_half_given_val_source_is_an_error_not_no_validation(tmp_path, given):
    half = DataSource(**{given: str(tmp_path / "val" / given)})
    dm = module(tmp_path, 2, 1, val=[DataSource(), half])
    assert dm.has_val()
    with pytest.raises(SpecError, match=r"dataset.val_data_sources\[1\] needs both image_dir and json_file"):
        dm.setup("fit")
    none = module(tmp_path / "b", 2, 1, val=[DataSource()])
    none.setup("fit")
    assert not none.has_val() and list(none.datasets) == ["train"]


def test_train_drops_the_partial_batch_val_and_test_keep_it(tmp_path):
    batch = int(torch.randint(2, 5, ()))
    n = batch * int(torch.randint(1, 4, ())) + int(torch.randint(1, batch, ()))  # never a multiple
    dm = module(tmp_path, n, batch)
    dm.setup("fit")
    dm.setup("test")
    train = list(dm.train_dataloader())
    assert len(train) == n // batch and all(len(b) == batch for b in train)
    ids = [t["image_id"] for b in train for t in b.targets]
    assert len(set(ids)) == len(ids) == n - n % batch
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        sizes = [len(b) for b in loader]
        assert sum(sizes) == n and sizes[-1] == n % batch


def test_ddp_sampler_keeps_drop_last(tmp_path):
    world, batch = int(torch.randint(2, 4, ())), 2
    n = world * batch * int(torch.randint(1, 3, ())) + int(torch.randint(1, world * batch, ()))
    dm = module(tmp_path, n, batch)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=world)
    per_process = -(-n // world)  # DistributedSampler pads every process to ceil(n / world)
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()  # as Lightning requests it
    seen = []
    for rank in range(world):
        sampler = _get_distributed_sampler(loader, shuffle=True, overfit_batches=0,
                                           mode=RunningStage.TRAINING, num_replicas=world, rank=rank)
        ddp = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
        assert ddp.drop_last and ddp.sampler is sampler
        batches = list(ddp)
        assert len(batches) == per_process // batch and all(len(b) == batch for b in batches)
        seen += [t["image_id"] for b in batches for t in b.targets]
    assert len(seen) == world * batch * (per_process // batch) and set(seen) <= set(range(1, n + 1))


def test_fewer_images_than_a_batch_is_a_clear_error(tmp_path):
    batch = int(torch.randint(3, 6, ()))
    dm = module(tmp_path, batch - 1, batch)
    dm.setup("fit")
    with pytest.raises(SpecError, match=rf"dataset.batch_size={batch} is more than the {batch - 1} train "
                                        r"images of dataset.train_data_sources.*zero steps"):
        dm.train_dataloader()
    assert len(list(dm.val_dataloader())) == 1  # eval keeps its one partial batch
    world = int(torch.randint(2, 5, ()))
    with pytest.raises(SpecError, match=rf"the 2 train images per process \({world} processes\)"):
        check_one_train_batch(2 * world - 1, 3, world)
    check_one_train_batch(2 * world + 1, 3, world)  # ceil: every process gets 3 (padded)
