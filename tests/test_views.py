"""Views (design §3.2): counter-based sampling and bit-exact replay."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tec_pipeline.data.views import ViewBox, replay_view, sample_view
from tests.conftest import sample_photos


def test_replay_is_bit_identical_in_another_process(tmp_path: Path) -> None:
    photo = sample_photos()[0]
    photo_path = tmp_path / "photo.png"
    photo.save(photo_path)
    box = sample_view(seed=7, row=123, view_id=1, width=photo.width, height=photo.height)
    here = replay_view(photo, box, 64)
    code = (
        "import sys, torch; from PIL import Image; from tec_pipeline.data.views import ViewBox, replay_view;"
        "b = ViewBox(*map(int, sys.argv[2:6]), bool(int(sys.argv[6])));"
        "torch.save(replay_view(Image.open(sys.argv[1]).convert('RGB'), b, 64), sys.argv[7])"
    )
    out = tmp_path / "view.pt"
    subprocess.run([sys.executable, "-c", code, str(photo_path), *map(str, box.as_array()), str(out)], check=True)
    there = torch.load(out, weights_only=True)
    assert there.dtype == torch.float32 and torch.equal(here, there)
    # and the box itself is reproducible from its key
    assert sample_view(7, 123, 1, photo.width, photo.height) == box
    assert ViewBox.from_array(box.as_array()) == box


def test_views_differ_by_view_id_row_and_seed() -> None:
    boxes = {sample_view(0, 5, v, 500, 375) for v in range(20)}
    assert len(boxes) == 20
    assert sample_view(0, 5, 0, 500, 375) != sample_view(0, 6, 0, 500, 375)
    assert sample_view(0, 5, 0, 500, 375) != sample_view(1, 5, 0, 500, 375)


def test_random_resized_crop_statistics() -> None:
    width, height = 500, 375
    fallbacks, flips = 0, 0
    for i in range(10_000):
        b = sample_view(0, i, 0, width, height)
        assert 0 <= b.top and b.top + b.height <= height and 0 <= b.left and b.left + b.width <= width
        flips += b.flip
        area = b.width * b.height / (width * height)
        aspect = b.width / b.height
        # integer rounding of w and h moves area and aspect by at most ~1 px on each side
        slack_area = (b.width + b.height + 1) / (width * height)
        slack_aspect = aspect * (1 / b.width + 1 / b.height)
        inside = (0.2 - slack_area <= area <= 1 + slack_area) and (3 / 4 - slack_aspect <= aspect <= 4 / 3 + slack_aspect)
        if not inside:
            fallbacks += 1
            assert (b.top, b.left) == ((height - b.height) // 2, (width - b.width) // 2)
    assert fallbacks < 100
    assert 4700 < flips < 5300


def test_replay_flip_mirrors_pixels() -> None:
    photo = sample_photos()[1]
    box = ViewBox(10, 20, 100, 120, False)
    a = replay_view(photo, box, 48)
    b = replay_view(photo, ViewBox(10, 20, 100, 120, True), 48)
    assert torch.equal(a.flip(-1), b)
    mean = a.mean(dim=(1, 2))
    assert torch.all(mean.abs() < 3) and np.isfinite(a.numpy()).all()
