"""Views (design §3.2): counter-based sampling and bit-exact replay."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tec_pipeline.data.views import (
    REPLAYS,
    ViewBox,
    replay_source,
    replay_view,
    replay_view_into,
    replay_view_uint8,
    sample_view,
)
from tec_pipeline.errors import UserError
from tests.conftest import sample_photos


@pytest.mark.parametrize("replay", list(REPLAYS))
def test_replay_is_bit_identical_in_another_process(replay: str, tmp_path: Path) -> None:
    photo = sample_photos()[0]
    photo_path = tmp_path / "photo.png"
    photo.save(photo_path)
    box = sample_view(seed=7, row=123, view_id=1, width=photo.width, height=photo.height)
    here = replay_view(photo, box, 64, replay)
    code = (  # another process, and another intra-op thread count: neither may change a bit
        "import sys, torch; from PIL import Image; from tec_pipeline.data.views import ViewBox, replay_view;"
        "torch.set_num_threads(3 - torch.get_num_threads() if torch.get_num_threads() < 3 else 1);"
        "b = ViewBox(*map(int, sys.argv[2:6]), bool(int(sys.argv[6])));"
        "torch.save(replay_view(Image.open(sys.argv[1]).convert('RGB'), b, 64, sys.argv[8]), sys.argv[7])"
    )
    out = tmp_path / "view.pt"
    subprocess.run([sys.executable, "-c", code, str(photo_path), *map(str, box.as_array()), str(out), replay],
                   check=True)
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


@pytest.mark.parametrize("replay", list(REPLAYS))
def test_replay_flip_mirrors_pixels(replay: str) -> None:
    photo = sample_photos()[1]
    box = ViewBox(10, 20, 100, 120, False)
    a = replay_view(photo, box, 48, replay)
    b = replay_view(photo, ViewBox(10, 20, 100, 120, True), 48, replay)
    assert torch.equal(a.flip(-1), b)
    mean = a.mean(dim=(1, 2))
    assert torch.all(mean.abs() < 3) and np.isfinite(a.numpy()).all()


def test_torch_replay_is_the_reference_filter_within_rounding() -> None:
    """The torch replay is the same bicubic antialiased resize as PIL's, differing only in integer rounding:
    a few grey levels (4 at most measured), on a few per cent of the values, over downscaled and upscaled crops of
    photos."""
    diffs = []
    for i, photo in enumerate(sample_photos()[:4]):
        for view in range(4):
            box = sample_view(0, i, view, photo.width, photo.height)
            for size in (224, 64):
                pil = replay_view_uint8(photo, box, size, "pil").int()
                fast = replay_view_uint8(photo, box, size, "torch").int()
                assert fast.dtype == pil.dtype and fast.shape == pil.shape == (3, size, size)
                diffs.append((fast - pil).abs().flatten())
    diff = torch.cat(diffs)
    assert diff.max() <= 6 and (diff > 0).float().mean() < 0.05, (diff.max(), (diff > 0).float().mean())
    assert diff.max() > 0  # they are two implementations: a store records which one made its pixels


def test_torch_replay_source_is_shared_by_views() -> None:
    photo = sample_photos()[2]
    source = replay_source(photo, "torch")
    assert source.shape == (3, photo.height, photo.width) and source.dtype == torch.uint8
    for view in range(3):
        box = sample_view(1, 9, view, photo.width, photo.height)
        into = replay_view_uint8(photo, box, 32, "torch")
        assert torch.equal(replay_view_into(torch.empty(3, 32, 32, dtype=torch.uint8), source, box, "torch"), into)
    with pytest.raises(ValueError, match="unknown replay"):
        replay_source(photo, "simd")


def test_earlier_torch_replay_record_still_reads() -> None:
    """Stores of the torch replay v1 (PIL decoded every image, as stage 2 still does) replay here; v2 records
    simplejpeg, and an unknown record is refused."""
    from tec_pipeline.data.views import READABLE_RECORDS, REPLAYS, recorded_replay

    assert REPLAYS["torch"]["version"] == 2 and "simplejpeg" in REPLAYS["torch"]
    assert recorded_replay({"replay": READABLE_RECORDS["torch"][0]}) == "torch"
    assert recorded_replay({"replay": REPLAYS["torch"]}) == "torch"
    with pytest.raises(UserError, match="re-run tec cache-targets"):
        recorded_replay({"replay": {**REPLAYS["torch"], "simplejpeg": "simplejpeg 0.0"}})
