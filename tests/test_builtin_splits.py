"""Every built-in set names its splits: an unknown split is refused in one line naming them, before any data is
loaded, and the photos set's validation and test splits are different images."""

import re

import numpy as np
import pytest

from mpp.commands.finetune import parse_config as parse_finetune_config
from mpp.commands.pretrain import parse_config
from mpp.data import builtin
from mpp.data.builtin import BUILTIN_DATASETS, BUILTIN_SPLITS, photos
from mpp.training.finetune import finetune
from mpp.training.pretrain import pretrain


def test_every_built_in_set_has_its_splits_listed():
    assert set(BUILTIN_SPLITS) == set(BUILTIN_DATASETS)


@pytest.mark.parametrize("name", sorted(BUILTIN_DATASETS))
def test_an_unknown_split_is_refused_before_loading_with_the_splits_named(name, refused, monkeypatch):
    """The function itself refuses the name (naming the same splits as the table the flags are checked with), and
    both recipes refuse it before the set is loaded."""
    with pytest.raises(ValueError) as e:
        BUILTIN_DATASETS[name]("bogus")  # refused before anything is read
    assert re.findall(r"'(\w+)'", str(e.value))[:-1] == list(BUILTIN_SPLITS[name]) and str(e.value).endswith("'bogus'")
    monkeypatch.setitem(
        builtin.BUILTIN_DATASETS, name, lambda *a, **k: pytest.fail("loaded before the split was checked")
    )
    allowed = ", ".join(BUILTIN_SPLITS[name])
    line = refused(lambda a: pretrain(parse_config(a)), ["--dataset", name, "--split", "bogus"])
    assert line == f"error: --split bogus: {name} has the splits {allowed}"
    line = refused(lambda a: finetune(parse_finetune_config(a)), ["--dataset", name, "--eval-split", "bogus"])
    assert line == f"error: --eval-split bogus: {name} has the splits {allowed}"


def test_photos_splits_are_different_crops_and_each_is_reproducible():
    crops = {
        s: np.asarray(photos(s, num_crops=40).with_format("numpy")["image"]) for s in ("train", "validation", "test")
    }
    assert all(c.shape == (40, 64, 64, 3) for c in crops.values())
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        shared = {x.tobytes() for x in crops[a]} & {x.tobytes() for x in crops[b]}
        assert not shared, (a, b)
    again = np.asarray(photos("validation", num_crops=40).with_format("numpy")["image"])
    assert np.array_equal(again, crops["validation"])
