"""The synthetic world is deterministic and its captions truthful; the committed detector judges it correctly."""
from __future__ import annotations

import numpy as np
import torch

from esd_bench import world

torch.set_num_threads(1)


def test_world_is_deterministic():
    a, b = world.make_sample(3, 7), world.make_sample(3, 7)
    assert np.array_equal(a.image, b.image)
    assert (a.caption, a.labels) == (b.caption, b.labels)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    # A sample does not depend on how many samples are drawn around it.
    images, labels, captions = world.make_dataset(3, 4, start=5)
    assert np.array_equal(images[2], a.image)
    assert captions[2] == a.caption
    assert list(labels[2]) == world.label_indices(a.labels)
    assert not np.array_equal(world.make_sample(3, 8).image, a.image)
    assert not np.array_equal(world.make_sample(4, 7).image, a.image)


def test_captions_name_only_true_attributes_and_some_are_empty():
    samples = [world.make_sample(11, i) for i in range(400)]
    empty = sum(not s.caption for s in samples) / len(samples)
    assert 0.05 < empty < 0.16
    for s in samples:
        named = world.attributes_in_text(s.caption)
        assert all(s.labels[a] == v for a, v in named.items()), (s.caption, s.labels)
        assert bool(named) == bool(s.caption)


def test_prompt_helpers_round_trip():
    prompt = world.prompt_for(shape="circle", color="red", style="striped")
    assert prompt == "a red circle on a striped background"
    assert world.attributes_in_text(prompt) == {"shape": "circle", "color": "red", "style": "striped"}
    assert world.attributes_in_text("an azure round disc, banded") == {"shape": "circle", "color": "blue",
                                                                      "style": "striped"}


def test_detector_classifies_fresh_clean_images():
    from esd_bench import detector

    images, labels, _ = world.make_dataset(seed=12345, n=24)
    preds = detector.classify(images)
    for i, attribute in enumerate(world.ATTRIBUTE_NAMES):
        truth = [world.ATTRIBUTES[attribute][j] for j in labels[:, i]]
        assert preds[attribute] == truth, attribute
