"""The shapes example's composed-query analysis (`examples.shapes.vlm.compose_misses`)."""

from examples.shapes import world
from examples.shapes.vlm import compose_misses


def test_compose_misses_counts_wrong_values_of_misses_only():
    ref = world.Scene("ref.jpg", "square", "red", "blue", "top", "small")
    target = world.Scene("t.jpg", "square", "green", "blue", "top", "small")  # colour edited
    rows = [  # rank past 10: background wrong (read off the image), the edit wrong
        {"image": "/x/ref.jpg", "targets": ["/x/t.jpg"], "rank": {"m": 40},
         "rewrites": {"m": ["a small red square at the top, yellow background"]}},
        # past 10 too, but only a synonym: counted as a miss, with nothing wrong
        {"image": "/x/ref.jpg", "targets": ["/x/t.jpg"], "rank": {"m": 11},
         "rewrites": {"m": ["a tiny emerald box in the upper part, navy backdrop"]}},
        # on the first page: not a miss, whatever it says
        {"image": "/x/ref.jpg", "targets": ["/x/t.jpg"], "rank": {"m": 3},
         "rewrites": {"m": ["a large purple circle, white background"]}},
    ]  # fmt: skip
    out = compose_misses(rows, [ref, target], ["m"])["m"]
    assert (out["misses"], out["queries"]) == (2, 3)
    assert out["background read_off_image"] == 0.5
    assert out["color edited"] == 0.5 and out["any edited"] == 0.5
    assert out["shape read_off_image"] == 0.0 and out["size read_off_image"] == 0.0
