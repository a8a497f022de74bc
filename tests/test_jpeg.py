"""simplejpeg for the torch replay (data/jpeg.py): the same pixels as PIL's decoder on every JPEG kind it takes,
PIL for the rest, and stage 1's torch-replay pixels (simplejpeg) equal stage 2's (PIL), row by row."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tec_pipeline.data.jpeg import decode_jpeg_rgb
from tec_pipeline.data.shards import ShardWriter, iter_samples, load_manifest, make_manifest, write_manifest
from tec_pipeline.data.views import ViewBox, replay_view_uint8, sample_view
from tec_pipeline.stage1.decode import decode_tasks
from tec_pipeline.store.layout import Task
from tests.conftest import sample_photos

pytestmark = pytest.mark.skipif(not sample_photos(), reason="needs scikit-image's sample photos")


def _jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def _variants() -> list[tuple[str, bytes]]:
    """Every JPEG kind PIL writes: chroma subsamplings, progressive, low quality, grayscale, odd sizes."""
    out = []
    for i, photo in enumerate(sample_photos()[:4]):
        photo = photo.resize((333 + 7 * i, 251 + 5 * i))  # sizes that are no multiple of the MCU
        out += [(f"{i}-q90", _jpeg(photo, quality=90)), (f"{i}-progressive", _jpeg(photo, progressive=True)),
                (f"{i}-444", _jpeg(photo, subsampling="4:4:4")), (f"{i}-422", _jpeg(photo, subsampling="4:2:2")),
                (f"{i}-420-q30", _jpeg(photo, subsampling="4:2:0", quality=30)),
                (f"{i}-gray", _jpeg(photo.convert("L")))]
    return out


def _pil_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def test_simplejpeg_gives_pils_pixels() -> None:
    for name, data in _variants():
        array = decode_jpeg_rgb(data)
        assert array is not None and array.dtype == np.uint8, name
        np.testing.assert_array_equal(array, _pil_rgb(data), err_msg=name)


def test_what_simplejpeg_does_not_take_is_left_to_pil() -> None:
    photo = sample_photos()[0].resize((64, 48))
    cmyk = _jpeg(photo.convert("CMYK"))
    png = io.BytesIO()
    photo.save(png, format="PNG")
    for data in (cmyk, png.getvalue(), _jpeg(photo)[:-300], b"not an image"):
        assert decode_jpeg_rgb(data) is None


def _kinds_shards(directory: Path) -> int:
    """Shards of JPEGs of every kind, a CMYK one (PIL decodes it), a truncated one (no image) and a PNG."""
    photo = sample_photos()[1].resize((120, 90))
    png = io.BytesIO()
    photo.save(png, format="PNG")
    records = [(data, "jpg") for _, data in _variants()]
    records += [(_jpeg(photo.convert("CMYK")), "jpg"), (_jpeg(photo)[:-200], "jpg"), (png.getvalue(), "png")]
    directory.mkdir(exist_ok=True)
    writer = ShardWriter(directory, "train", 10)
    for row, (data, ext) in enumerate(records):
        writer.write(f"{row:04d}", data, ext, row % 3)
    write_manifest(directory, make_manifest(writer.finish(), ["a", "b", "c"], "test:jpeg-kinds", "train"))
    return len(records)


def _counting_simplejpeg(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray | None]:
    import tec_pipeline.data.jpeg as jpeg

    decoded: list[np.ndarray | None] = []

    def counted(data: bytes) -> np.ndarray | None:
        decoded.append(decode_jpeg_rgb(data))
        return decoded[-1]

    monkeypatch.setattr(jpeg, "decode_jpeg_rgb", counted)
    return decoded


def test_torch_replay_stage1_pixels_equal_pils(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 1's torch-replay pixels (simplejpeg where it can) equal the torch replay of PIL's decode (what
    verify recomputes from), row by row, view by view."""
    n, size = _kinds_shards(tmp_path), 32
    manifest = load_manifest(tmp_path)
    by_simplejpeg = _counting_simplejpeg(monkeypatch)
    stage1 = decode_tasks(str(tmp_path), manifest, [Task(0, 0, 0, n), Task(1, 0, 0, n)], 5, size, "torch")
    # simplejpeg decoded every clean JPEG (each once for both views), PIL the CMYK and truncated ones
    assert [a is not None for a in by_simplejpeg] == [True] * len(_variants()) + [False, False]
    samples = list(iter_samples(str(tmp_path), 0, n, manifest))
    assert [s.image is None for s in samples] == [not v for v in stage1[0].valid]
    assert sum(s.image is None for s in samples) == 1  # only the truncated JPEG
    for view, inputs in enumerate(stage1):
        for sample in samples:
            if sample.image is None:
                assert not inputs.pixels[sample.row].any()
                continue
            box = ViewBox.from_array(inputs.boxes[sample.row])
            assert box == sample_view(5, sample.row, view, *sample.image.size)
            assert torch.equal(inputs.pixels[sample.row], replay_view_uint8(sample.image, box, size, "torch")), \
                (view, sample.row)


def test_torch_store_stage2_decodes_as_stage1(tmp_path: Path, pico_base: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 2's loader decodes a torch-replay store's JPEGs with simplejpeg too, and replays stage 1's pixels."""
    from tec_pipeline.data.shards import iter_fields
    from tec_pipeline.stage1 import CacheConfig, cache_targets
    from tec_pipeline.stage2.cached import CachedViews
    from tec_pipeline.store.target_store import TargetStore

    shards, out = tmp_path / "shards", tmp_path / "torch.zarr"
    n = _kinds_shards(shards)
    cache_targets(CacheConfig(shards=str(shards), base_model=str(pico_base), out=str(out), views=1, topk=4,
                              chunk_rows=16, batch_size=8, codec="fp16", loader_workers=0, replay="torch"))
    size = TargetStore.open(out).attrs["base_model"]["input_size"]
    stage1 = decode_tasks(str(shards), load_manifest(shards), [Task(0, 0, 0, 16)], 0, size, "torch")[0]
    views = CachedViews(str(out), 0, size)
    by_simplejpeg = _counting_simplejpeg(monkeypatch)
    for row, key, fields in iter_fields(str(shards), 0, 16):
        sample = views.decode(row, key, fields)
        assert isinstance(sample.image, np.ndarray)  # the first 16 rows are clean JPEGs
        assert sample.label == row % 3  # the label is read as by PIL's decode
        assert torch.equal(views(sample, views.stored(row))["pixels"], stage1.pixels[row]), row
    assert len(by_simplejpeg) == 16 and n > 16
