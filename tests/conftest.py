"""Shared fixtures: small real data (Fashion-MNIST rows, bundled sample photos) and generated image folders."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from tec_pipeline.data.shards import iter_samples, load_manifest
from tec_pipeline.data.sources import DEFAULT_FASHION_MNIST_DIR
from tec_pipeline.data.writing import write_shards

os.environ.setdefault("TEC_NO_PROGRESS", "1")
# Tests run tiny ViTs, for which a second compute thread only adds contention (measured 10-50x slower steps
# when the two cores are also decoding); subprocesses inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
FASHION_MNIST = Path(DEFAULT_FASHION_MNIST_DIR)
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file() and not os.environ.get("CI"),
    reason="dataset-fashion-mnist not installed (make install installs it)",
)


# The suite runs on pytest-xdist workers (`make test`: -n 3 --dist worksteal), which take tests in collection order:
# the longest test goes first so that it overlaps everything else instead of starting last and running alone.
RUN_FIRST = ("tests/test_reproduce.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not item.nodeid.startswith(RUN_FIRST))  # stable: the rest keep their order


def free_port() -> int:
    """A TCP port free now on 127.0.0.1, for a server a test starts (never a fixed one: xdist workers run side by
    side)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 Fashion-MNIST training images in 3 shards (seed 0)."""
    out = tmp_path_factory.mktemp("fmnist") / "train"
    write_shards("fashion-mnist", out, "train", shard_size=128, limit=300, seed=0, progress=False)
    return out


def sample_photos() -> list[Image.Image]:
    """Real photos bundled with scikit-image (RGB JPEG/PNG), used for decode and crop tests."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    names = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png"]
    return [Image.open(data / n).convert("RGB") for n in names if (data / n).is_file()]


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    """An ImageFolder of JPEGs of varied sizes, plus a grayscale JPEG, a palette PNG and a CMYK JPEG."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    photos = sample_photos()
    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            w, h = int(rng.integers(40, 300)), int(rng.integers(40, 300))
            if photos:
                im = photos[(c * 6 + i) % len(photos)].resize((w, h))
            else:
                im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            im.save(root / cls / f"img.{i}.jpg", quality=90)
    Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8), mode="L").save(root / "cat" / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (33, 45, 3), dtype=np.uint8)).convert("P").save(root / "dog" / "pal.png")
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).convert("CMYK").save(root / "dog" / "cmyk.jpg")
    return root


def run_tec(*args: str, check: bool = False, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """`tec ARGS` in a fresh interpreter, as a user runs it."""
    import sys

    proc = subprocess.run([sys.executable, "-c", "import cli; cli.main()", *args], capture_output=True, text=True,
                          **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"tec {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("base model ")]
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr


def save_base_checkpoint(path: Path, arch_name: str = "tec_pico_p4_16", seed: int = 0) -> Path:
    """A random base model in this project's own checkpoint format (architecture recorded)."""
    import torch

    from tec_pipeline.models.vit import build_vit, resolve_arch

    torch.manual_seed(seed)
    arch = resolve_arch(arch_name)
    torch.save({"model": build_vit(arch).state_dict(), "arch": arch.to_dict(), "kind": "mae", "config": {},
                "version": "test"}, path)
    return path


@pytest.fixture(scope="session")
def pico_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base_checkpoint(tmp_path_factory.mktemp("base") / "pico base.pth")


def tec_in_process(capfd: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """`tec ARGS` run in this interpreter (no start-up cost), with its exit code and fd-level output."""
    import cli

    capfd.readouterr()
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def tensorboard_scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar tag of the TensorBoard event files under RUN/tensorboard, read back as TensorBoard does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [event.value for event in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# stage-1 settings of the small fp32 store that the failure, reliability and repair tests compare against
SMALL_CACHE = {"views": 2, "topk": 4, "chunk_rows": 64, "batch_size": 32, "codec": "fp32", "loader_workers": 0}


@pytest.fixture(scope="session")
def reference_store(fmnist_shards: Path, pico_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted in-process stage-1 run with SMALL_CACHE: what every interrupted, failed or repaired run
    must end up equal to. Shared by the session: tests copy it before they damage anything."""
    from tec_pipeline.stage1 import CacheConfig, cache_targets

    out = tmp_path_factory.mktemp("reference") / "reference.zarr"
    cache_targets(CacheConfig(shards=str(fmnist_shards), base_model=str(pico_base), out=str(out), **SMALL_CACHE))
    return out


def small_cache_argv(shards: Path, base: Path, out: Path) -> list[str]:
    """`tec cache-targets` argv of the reference store's settings."""
    return cache_targets_argv(shards, base, out, SMALL_CACHE)


def cache_targets_argv(shards: Path, base: Path, out: Path, settings: dict[str, object]) -> list[str]:
    """`tec cache-targets` argv with `settings` (CacheConfig field names) as flags."""
    return ["cache-targets", "--shards", str(shards), "--base-model", str(base), "--out", str(out),
            *[x for key, value in settings.items() for x in (f"--{key.replace('_', '-')}", str(value))]]


# `python -c SLOW_WRITER SECONDS ARGS...`: `tec ARGS` whose every task write first sleeps SECONDS, so that a test
# can act (kill it, start a second writer) while it is half-way
SLOW_WRITER = """
import sys, time
from tec_pipeline.store.target_store import TargetStore
write = TargetStore.write_task
def slow(self, *a, **k):
    time.sleep(float(sys.argv[1]))
    return write(self, *a, **k)
TargetStore.write_task = slow
import cli
cli.main(sys.argv[2:])
"""


def kill_half_way(proc: subprocess.Popen, store: str, timeout: float = 120, poll_s: float = 0.05) -> np.ndarray:
    """SIGKILL the process group of `proc` (started with start_new_session) as soon as the store at `store`
    has a finished task; returns the store's done mask [V, T] after the kill, asserted to be partial.
    poll_s: seconds between looks (over a network each look is a dozen requests that compete with the run)."""
    import signal
    import time

    from tec_pipeline.store.target_store import TargetStore

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if TargetStore.open(store).done_mask().any():
                break
        except Exception:  # noqa: BLE001 - the store may not exist yet
            pass
        time.sleep(poll_s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = TargetStore.open(store).done_mask()
    assert 0 < done.sum() < done.size, "the run was not killed half-way"
    return done


def assert_same_store(ours: Path, reference: Path) -> None:
    """Same arrays (bit for bit), same attributes, same objects on disk (no leftovers of killed writes)."""
    files = [sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
             for root in (ours, reference)]
    assert files[0] == files[1], set(files[0]) ^ set(files[1])
    a, b = zarr.open_group(str(ours), mode="r"), zarr.open_group(str(reference), mode="r")
    assert dict(a.attrs) == dict(b.attrs)
    for name in b.array_keys():
        assert np.array_equal(a[name][...], b[name][...]), name


@pytest.fixture(scope="session")
def damaged_shards(fmnist_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """94 Fashion-MNIST images as JPEG/PNG files + a truncated JPEG + a PNG with a flipped byte, in 3 shards;
    the last shard is then cut inside a sample. Returns the shards and the rows that cannot be decoded."""
    root = tmp_path_factory.mktemp("damaged")
    folder = root / "images"
    for sample in iter_samples(fmnist_shards, 0, 94):
        classdir = folder / f"class {sample.label}"
        classdir.mkdir(parents=True, exist_ok=True)
        sample.image.save(classdir / f"{sample.key}.{'jpg' if sample.row % 2 else 'png'}")
    jpeg, png = io.BytesIO(), io.BytesIO()
    sample.image.save(jpeg, "JPEG")
    sample.image.save(png, "PNG")
    (folder / "class 0" / "broken.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    flipped = bytearray(png.getvalue())
    flipped[len(flipped) // 2] ^= 0xFF  # inside the image data: its CRC no longer matches
    (folder / "class 1" / "broken.png").write_bytes(bytes(flipped))
    shards = root / "shards"
    write_shards(f"imagefolder:{folder}", shards, shard_size=32, seed=0, progress=False)
    bad = {s.row for s in iter_samples(shards) if "broken" in str(s.key)}
    last = load_manifest(shards).shards[-1]
    with tarfile.open(shards / last.name) as tar:
        images = [m for m in tar.getmembers() if not m.name.endswith(".cls")]
    cut = last.count - 4  # this sample's image is cut in half; it and the 3 after it are lost
    os.truncate(shards / last.name, images[cut].offset_data + images[cut].size // 2)
    return shards, sorted(bad | set(range(last.first_row + cut, last.first_row + last.count)))
