"""A missing annotation file, classmap or image folder names the spec key that gave its path
(`dataset.train_data_sources[1].json_file: annotation file ... does not exist`), so the user knows
which of several sources to fix; without a key the message is the path alone, as before."""
import re

import numpy as np
import pytest

from codetr.data.build import build_infer_dataset, build_label_map, load_split_sources
from codetr.data.classmap import ClassmapError, label_map_from_classmap, read_classmap
from codetr.data.images import ImageFolderDataset, list_images
from codetr.spec.schema import DataSource, ExperimentSpec, InferDataSource
from data_fixtures import make_coco


def _missing(tmp_path, stem: str) -> str:
    return str(tmp_path / f"{stem}-{np.random.randint(10**6)}")


def test_classmap_and_image_folder_name_the_key(tmp_path):
    classmap, folder = _missing(tmp_path, "classmap.txt"), _missing(tmp_path, "images")
    key = "dataset.infer_data_sources.classmap"
    with pytest.raises(ClassmapError, match=rf"^{re.escape(key)}: classmap file {re.escape(classmap)} "
                                            "does not exist$"):
        read_classmap(classmap, where=key)
    with pytest.raises(ClassmapError, match=rf"^{re.escape(key)}: classmap file"):
        label_map_from_classmap(classmap, 5, True, where=key)
    with pytest.raises(ClassmapError, match=rf"^classmap file {re.escape(classmap)} does not exist$"):
        read_classmap(classmap)
    key = "dataset.infer_data_sources.image_dir"
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(key)}: image folder {re.escape(folder)} "):
        list_images(folder, where=key)
    with pytest.raises(FileNotFoundError, match=rf"^image folder {re.escape(folder)} does not exist"):
        list_images(folder)


def test_a_list_of_image_folders_names_the_missing_one_by_index(tmp_path):
    make_coco(tmp_path / "a", n_images=2, seed=int(np.random.randint(1000)))
    dirs = [str(tmp_path / "a" / "images")] * int(np.random.randint(1, 4))
    index = len(dirs)
    dirs.append(_missing(tmp_path, "images"))
    with pytest.raises(FileNotFoundError, match=rf"^dataset\.infer_data_sources\.image_dir\[{index}\]: "
                                                rf"image folder {re.escape(dirs[-1])} "):
        ImageFolderDataset(dirs, None, where="dataset.infer_data_sources.image_dir")


def test_spec_sources_name_their_key(tmp_path):
    rng = np.random.default_rng()
    good = make_coco(tmp_path / "good", n_images=2, seed=int(rng.integers(1000)))
    spec = ExperimentSpec()
    ds = spec.dataset
    # an empty entry before the missing file: the key still counts the spec's list, which
    # split_sources filters (index 2 in the spec, 1 after filtering)
    ds.train_data_sources = [DataSource(str(good[1]), str(good[0])), DataSource("", ""),
                             DataSource(str(good[1]), _missing(tmp_path, "train.json"))]
    with pytest.raises(FileNotFoundError,
                       match=r"^dataset\.train_data_sources\[2\]\.json_file: annotation file "):
        load_split_sources(spec, "train")
    ds.train_data_sources = []
    ds.test_data_sources = DataSource(str(good[1]), _missing(tmp_path, "test.json"))
    with pytest.raises(FileNotFoundError, match=r"^dataset\.test_data_sources\.json_file: "):
        build_label_map(spec)
    ds.test_data_sources = None
    ds.infer_data_sources = InferDataSource(image_dir=_missing(tmp_path, "images"),
                                            classmap=_missing(tmp_path, "classmap.txt"))
    with pytest.raises(ClassmapError, match=r"^dataset\.infer_data_sources\.classmap: "):
        build_label_map(spec)
    with pytest.raises(FileNotFoundError, match=r"^dataset\.infer_data_sources\.image_dir: image "):
        build_infer_dataset(spec)
