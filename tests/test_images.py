"""ImageDataset's decoding and bad-image policies, and the collation that leaves skipped images
out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from taxonclip.data.images import NO_LABEL, ImageDataset, collate_skipping, decode_image
from taxonclip.errors import ConfigError, DataError


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


@pytest.fixture
def paths(tmp_path) -> list[str]:
    """Three good images (one greyscale, one RGBA) and one broken file, second from the end."""
    good = [(tmp_path / "a.png", "RGB", (10, 20, 30)), (tmp_path / "b.png", "L", 90),
            (tmp_path / "d.png", "RGBA", (1, 2, 3, 4))]
    for path, mode, colour in good:
        Image.new(mode, (3, 3), colour).save(path)
    broken = tmp_path / "c.png"
    broken.write_bytes(b"\x89PNG broken")
    return [str(good[0][0]), str(good[1][0]), str(broken), str(good[2][0])]


def test_items_are_transformed_rgb_with_label_and_position(paths):
    dataset = ImageDataset(paths, _to_tensor, labels=[5, 6, 7, 8])
    image, label, position = dataset[1]
    assert image.shape == (3, 3, 3) and torch.all(image == 90)
    assert (label, position) == (6, 1)
    assert ImageDataset(paths, _to_tensor)[3][1:] == (NO_LABEL, 3)
    assert len(dataset) == 4


def test_decode_failure_names_the_path_under_error_policy(paths):
    with pytest.raises(DataError, match=f"cannot decode image {paths[2]}: cannot identify"):
        ImageDataset(paths, _to_tensor)[2]
    with pytest.raises(DataError, match="no.png"):
        decode_image(str(Path(paths[0]).with_name("no.png")))


def test_decode_failure_gives_none_under_skip_policy(paths):
    dataset = ImageDataset(paths, _to_tensor, missing="skip")
    assert dataset[2] is None
    assert dataset[3] is not None


def test_collate_leaves_out_skipped_images(paths):
    dataset = ImageDataset(paths, _to_tensor, labels=[5, 6, 7, 8], missing="skip")
    images, labels, positions = collate_skipping([dataset[i] for i in range(4)])
    assert images.shape == (3, 3, 3, 3)
    assert labels.tolist() == [5, 6, 8] and positions.tolist() == [0, 1, 3]
    for k, i in enumerate(positions.tolist()):
        assert torch.equal(images[k], dataset[i][0])


def test_collate_of_nothing_decoded_gives_empty_tensors():
    images, labels, positions = collate_skipping([None, None])
    assert images.numel() == 0 and labels.numel() == 0 and positions.numel() == 0
    assert labels.dtype == positions.dtype == torch.long


def test_loader_reports_which_images_came_back(paths):
    dataset = ImageDataset(paths, _to_tensor, missing="skip")
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_skipping)
    returned = [i for _, _, positions in loader for i in positions.tolist()]
    assert returned == [0, 1, 3]


def test_bad_arguments(paths):
    with pytest.raises(DataError, match="3 labels for 4 images"):
        ImageDataset(paths, _to_tensor, labels=[1, 2, 3])
    with pytest.raises(ConfigError, match="'missing'"):
        ImageDataset(paths, _to_tensor, missing="drop")
