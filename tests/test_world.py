"""The procedural world for the toy models: deterministic per seed, captions that match the picture, ground-
truth boxes that hold the objects, known paths."""

import numpy as np

from attnpack.eval import colour_box_finder
from attnpack.training.world import COLOURS, VOCABULARY, dataset, sample


def test_deterministic_per_seed():
    a, b = sample(7, size=32, frames=8), sample(7, size=32, frames=8)
    assert np.array_equal(a.frames, b.frames) and a.caption == b.caption and a.boxes == b.boxes
    assert not np.array_equal(sample(8, size=32).frames, a.frames[:1])
    assert [s.caption for s in dataset(5, seed=3)] == [sample(3 + i).caption for i in range(5)]


def test_captions_use_the_vocabulary_and_name_every_object():
    for s in dataset(40, frames=4):
        words = s.caption.split()
        assert set(words) <= set(VOCABULARY)
        for thing in s.things:
            assert f"{thing.colour} {thing.shape}" in s.caption
            assert f"moves {thing.path}" in s.caption


def test_boxes_hold_the_objects():
    checked = 0
    for seed in range(16):
        s = sample(seed, size=48, frames=6, max_things=1)
        (thing,) = s.things
        if thing.colour == "white" or (s.textured and thing.colour in ("blue", "green")):
            continue  # a colour the plain finder cannot tell from this background
        finder = colour_box_finder(COLOURS[thing.colour], tolerance=30)
        for frame, box in zip(s.frames, s.boxes[0], strict=True):
            found = finder(frame)
            assert found is not None and np.allclose(found, box, atol=1.5 / 48)
        checked += 1
    assert checked >= 8


def test_paths_move_the_way_the_caption_says():
    for seed in range(60):
        s = sample(seed, size=48, frames=9, max_things=1)
        (thing,) = s.things
        first, last = s.boxes[0][0], s.boxes[0][-1]
        if thing.path == "right":
            assert last[2] > first[2]
        elif thing.path == "left":
            assert last[2] < first[2]
        elif thing.path == "down":
            assert last[0] > first[0]
        elif thing.path == "up":
            assert last[0] < first[0]
