"""The one content digest (ctdiff.io.digest) is pinned: checkpoints and caches store it, so a changed recipe
would make every resumable run start over and every preprocessed case be redone."""

from pathlib import Path

import pytest

from ctdiff.io import digest

# Each value was computed by the helpers digest replaced (preprocess's params fingerprint, the training
# scaffold's params hash, the processed format's digest), before they became one.
PINNED = [
    ({"b": [1, 2.5, "x"], "a": {"nested": True, "none": None}}, "af38a71f9c74413b"),
    ({"format": 3, "seed": 0, "lr": 1e-4, "patch": [8, 16, 16], "data": {"train": {"case_001": "0123abcd"}}},
     "4cff84cba71c65c7"),
    (["é", 0.1, -0, 1e300], "83a041e0c40c2270"),
    ({"cache": Path("data/processed"), "shape": (48, 96, 96)}, "9ef1401b9a9367db"),  # a path by str, a tuple as a list
]


@pytest.mark.parametrize(("obj", "expected"), PINNED)
def test_digest_is_the_pinned_value(obj, expected):
    assert digest(obj) == expected


def test_key_order_does_not_matter_and_values_do():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert len({digest({"a": 1}), digest({"a": 1.5}), digest({"a": "1"}), digest({"a": [1]})}) == 4
