"""Target store contract (design §3.4): layout, tasks, resume, URLs, integrity, sizes, concurrent writers."""

import multiprocessing
import os
import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from tec_pipeline.errors import UserError
from tec_pipeline.store.integrity import check_integrity, describe
from tec_pipeline.store.layout import StoreSpec, Task
from tec_pipeline.store.target_store import TargetStore

L, D, H, K = 4, 8, 2, 3
ATTRS = {"base_model": {"sha256": "abc", "input_size": 16}, "seed": 0, "package_version": "0.1.0"}


def _spec(codec: str = "fp32", **changes: int) -> StoreSpec:
    """V=2 views, N=10 rows, C=4 → tasks of rows 0-4, 4-8 and a ragged 8-10 per view."""
    return StoreSpec(**{"views": 2, "rows": 10, "patches": L, "dim": D, "heads": H, "k": K, "chunk_rows": 4,
                        "codec": codec, **changes})


def _rows(task: Task) -> dict[str, np.ndarray]:
    """Deterministic inputs for one task; row 1 of task (1, 1) is an undecodable image."""
    rng = np.random.default_rng(100 * task.view + task.index)
    n = task.rows
    valid = np.ones(n, bool)
    if (task.view, task.index) == (1, 1):
        valid[1] = False
    return {
        "features": rng.standard_normal((n, L, D), dtype=np.float32),
        "attention": rng.standard_normal((n, 1 + K, H, L), dtype=np.float32),
        "topk_index": rng.integers(0, L, (n, K)),
        "boxes": rng.integers(0, 200, (n, 5)),
        "valid": valid,
    }


def _expected(spec: StoreSpec, view: int) -> dict[str, np.ndarray]:
    """What a full view must read back as: inputs concatenated, invalid rows zero."""
    parts = [_rows(Task(view, t, 4 * t, min(10, 4 * t + 4))) for t in range(3)]
    out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    for key in ("features", "attention", "topk_index", "boxes"):
        out[key][~out["valid"]] = 0
    return out


def _filled(url: str, codec: str = "fp32") -> TargetStore:
    store = TargetStore.create_or_resume(url, _spec(codec), ATTRS)
    for task in store.tasks()[::-1]:
        store.write_task(task, **_rows(task))
    return store


def _memory_url() -> str:
    return f"memory://tec-test-{uuid.uuid4().hex}/store.zarr"


def test_arrays_have_the_contract_shapes_dtypes_and_chunks(tmp_path: Path) -> None:
    TargetStore.create_or_resume(tmp_path / "s.zarr", _spec("int8"), ATTRS)
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    expected = {  # name: (shape, dtype, chunks); done is chunked (1, 1) so each task owns its flag
        "features": ((2, 10, L, D), "int8", (1, 4, L, D)),
        "feature_scale": ((2, 10, L), "float16", (1, 4, L)),
        "attention": ((2, 10, 1 + K, H, L), "float16", (1, 4, 1 + K, H, L)),
        "topk_index": ((2, 10, K), "int16", (1, 4, K)),
        "boxes": ((2, 10, 5), "int32", (1, 4, 5)),
        "valid": ((2, 10), "bool", (1, 4)),
        "done": ((2, 3), "bool", (1, 1)),
    }
    assert sorted(group.array_keys()) == sorted(expected)
    for name, (shape, dtype, chunks) in expected.items():
        arr = group[name]
        assert (arr.shape, str(arr.dtype), arr.chunks) == (shape, dtype, chunks), name
    tec = group.attrs["tec"]
    assert tec["format_version"] == 1 and tec["codec"] == "int8" and tec["spec"]["chunk_rows"] == 4
    assert tec["base_model"] == ATTRS["base_model"]


def test_tasks_cover_rows_with_a_ragged_last_chunk(tmp_path: Path) -> None:
    store = TargetStore.create_or_resume(tmp_path / "s.zarr", _spec(), ATTRS)
    assert [(t.view, t.index, t.row_start, t.row_stop) for t in store.tasks()] == [
        (v, i, a, b) for v in range(2) for i, (a, b) in enumerate([(0, 4), (4, 8), (8, 10)])
    ]


def test_out_of_order_writes_read_back_exactly(tmp_path: Path) -> None:
    store = _filled(str(tmp_path / "s.zarr"))
    assert store.done_mask().all() and store.pending_tasks() == []
    for view in range(2):
        got, want = store.read_rows(view, 0, 10), _expected(store.spec, view)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert got["features"].dtype == np.float32 and got["topk_index"].dtype == np.int64
    across = store.read_rows(1, 3, 9)  # spans three chunks
    np.testing.assert_array_equal(across["features"], _expected(store.spec, 1)["features"][3:9])
    assert not across["valid"][5 - 3]  # row 5 of view 1 is the undecodable image


def test_read_rows_reads_each_chunk_once(monkeypatch: pytest.MonkeyPatch) -> None:
    store = _filled(_memory_url())
    calls: list[str] = []
    original = zarr.storage.FsspecStore.get

    async def counting_get(self, key, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.FsspecStore, "get", counting_get)
    store.read_rows(0, 0, 10)
    chunk_reads = [key for key in calls if "/c/" in key]
    assert len(chunk_reads) == 5 * 3  # 5 arrays × 3 chunks, not one read per row
    assert len(set(chunk_reads)) == len(chunk_reads)


def test_resume_with_same_settings_leaves_only_unwritten_tasks(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    store = TargetStore.create_or_resume(url, _spec(), ATTRS)
    written = [store.tasks()[4], store.tasks()[0]]
    for task in written:
        store.write_task(task, **_rows(task))
    resumed = TargetStore.create_or_resume(url, _spec(), {**ATTRS, "package_version": "9.9"})
    assert resumed.pending_tasks() == [t for t in store.tasks() if t not in written]
    np.testing.assert_array_equal(resumed.read_rows(1, 4, 8)["features"], _expected(store.spec, 1)["features"][4:8])


def test_failed_task_stays_pending(tmp_path: Path) -> None:
    store = TargetStore.create_or_resume(tmp_path / "s.zarr", _spec(), ATTRS)
    task = store.tasks()[1]
    bad = _rows(task)
    bad["attention"][0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        store.write_task(task, **bad)
    assert not store.is_done(task)


def test_task_of_only_undecodable_images_is_stored(tmp_path: Path) -> None:
    """Its chunks are all zeros (= fill value) and must still be written, or verify would call them lost."""
    store = TargetStore.create_or_resume(tmp_path / "s.zarr", _spec("ecq"), ATTRS)
    for task in store.tasks():
        rows = _rows(task)
        store.write_task(task, **{**rows, "valid": np.zeros(task.rows, bool) if task.index == 2 else rows["valid"]})
    assert check_integrity(store) == []
    got = store.read_rows(0, 8, 10)
    assert not got["valid"].any() and not got["features"].any() and not got["boxes"].any()


@pytest.mark.parametrize(
    ("spec_changes", "attrs", "named"),
    [
        ({"chunk_rows": 5}, ATTRS, "chunk_rows: stored 4, requested 5"),
        ({}, {**ATTRS, "base_model": {"sha256": "def", "input_size": 16}}, "base_model.sha256: stored 'abc'"),
        ({}, {**ATTRS, "last_layers": 2}, "last_layers: not in the store"),
    ],
)
def test_resume_with_other_settings_is_refused(tmp_path: Path, spec_changes: dict, attrs: dict, named: str) -> None:
    url = str(tmp_path / "s.zarr")
    store = TargetStore.create_or_resume(url, _spec(), ATTRS)
    store.write_task(store.tasks()[0], **_rows(store.tasks()[0]))
    with pytest.raises(UserError, match="--out") as err:
        TargetStore.create_or_resume(url, _spec(**spec_changes), attrs)
    assert named in str(err.value) and "\n" not in str(err.value)
    assert TargetStore.open(url).is_done(store.tasks()[0])  # nothing was overwritten


@pytest.mark.parametrize("scheme", ["memory", "file", "path"])
def test_store_urls(tmp_path: Path, scheme: str) -> None:
    url = {"memory": _memory_url(), "file": f"file://{tmp_path}/s.zarr", "path": str(tmp_path / "s.zarr")}[scheme]
    _filled(url, codec="ecq")
    reader = TargetStore.open(url, mode="r")
    got = reader.read_rows(0, 0, 10)
    assert np.abs(got["features"] - _expected(reader.spec, 0)["features"]).max() <= 0.176
    with pytest.raises(ValueError, match="read-only"):
        reader.write_task(reader.tasks()[0], **_rows(reader.tasks()[0]))


def test_opening_something_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a").write_text("x")
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    for url in [tmp_path / "missing", tmp_path / "file.txt", tmp_path / "dir", tmp_path / "plain.zarr",
                _memory_url()]:
        with pytest.raises(UserError) as err:
            TargetStore.open(url)
        assert "\n" not in str(err.value) and str(url) in str(err.value)
    with pytest.raises(UserError, match="not a target store"):
        TargetStore.create_or_resume(tmp_path / "dir", _spec(), ATTRS)
    assert (tmp_path / "dir" / "a").read_text() == "x"


def test_integrity_of_a_complete_store_is_clean(tmp_path: Path) -> None:
    assert check_integrity(_filled(str(tmp_path / "s.zarr"), codec="int8")) == []


@pytest.mark.parametrize("damage", ["task not done", "chunk deleted", "chunk corrupted"])
def test_integrity_names_the_damage(tmp_path: Path, damage: str) -> None:
    root = tmp_path / "s.zarr"
    _filled(str(root), codec="fp16")
    chunk = root / "attention" / "c" / "1" / "2" / "0" / "0" / "0"  # view 1, task 2 (rows 8-10)
    assert chunk.is_file()
    if damage == "task not done":
        zarr.open_group(root, mode="r+")["done"][0, 1] = False
        expected = "view 0: 1 of 3 tasks not done (tasks 1)"
    elif damage == "chunk deleted":
        chunk.unlink()
        expected = "attention: chunk of done view 1 task 2 (rows 8-10) is missing"
    else:
        chunk.write_bytes(np.random.default_rng(0).bytes(chunk.stat().st_size))
        expected = "attention: chunk of view 1 task 2 (rows 8-10) does not decode"
    reasons = check_integrity(TargetStore.open(root))
    assert len(reasons) == 1 and reasons[0].startswith(expected), reasons


def test_describe_reports_progress_and_sizes(tmp_path: Path) -> None:
    store = TargetStore.create_or_resume(tmp_path / "s.zarr", _spec("fp16"), ATTRS)
    for task in store.tasks()[3:]:  # all of view 1
        store.write_task(task, **_rows(task))
    info = describe(store)
    assert (info["tasks_done"], info["tasks_total"], info["rows_done"], info["invalid_rows"]) == (3, 6, 10, 1)
    features = info["arrays"]["features"]
    # fp16 is stored raw: 3 chunks of 4 rows (the ragged one padded) + a 4-byte CRC each
    assert features["stored_bytes"] == 3 * (4 * L * D * 2 + 4)
    assert features["raw_bytes"] == 2 * 10 * L * D * 2
    assert features["stored_bytes_per_image_view"] == features["stored_bytes"] / 10
    assert info["stored_bytes"] > sum(a["stored_bytes"] for a in info["arrays"].values())  # + metadata
    assert info["attrs"]["base_model"]["sha256"] == "abc" and info["codec"] == "fp16"


def test_pickles_as_its_url_and_reopens_lazily(tmp_path: Path) -> None:
    store = _filled(str(tmp_path / "s.zarr"))
    store.read_rows(0, 0, 2)
    clone = pickle.loads(pickle.dumps(store))
    assert clone._group is None  # nothing opened until first use
    np.testing.assert_array_equal(clone.read_rows(0, 0, 10)["features"], store.read_rows(0, 0, 10)["features"])
    assert len(pickle.dumps(store)) < 300


def _read_in_child(store: TargetStore, queue: multiprocessing.Queue) -> None:
    rows = store.read_rows(0, 0, 10)
    queue.put((store._pid == os.getpid(), rows["features"].tobytes()))


def test_forked_worker_opens_its_own_handles(tmp_path: Path) -> None:
    """A DataLoader worker forked after the parent read keeps a copy of its handles; it must not use them."""
    store = _filled(str(tmp_path / "s.zarr"))
    parent = store.read_rows(0, 0, 10)["features"]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(store, queue))
    child.start()
    reopened, features = queue.get(timeout=60)
    child.join(timeout=60)
    assert reopened and features == parent.tobytes()


def _write_tasks(store: TargetStore, tasks: list[Task]) -> None:
    for task in tasks:
        store.write_task(task, **_rows(task))


def test_concurrent_writers_in_two_processes(tmp_path: Path) -> None:
    """Two spawned processes write interleaved tasks of the same views: no flag or row is lost."""
    store = TargetStore.create_or_resume(tmp_path / "s.zarr", _spec(rows=120, chunk_rows=2), ATTRS)
    tasks = store.tasks()
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_write_tasks, args=(store, tasks[i::2])) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    reopened = TargetStore.open(tmp_path / "s.zarr")
    assert reopened.done_mask().all() and check_integrity(reopened) == []
    for task in tasks:
        got = reopened.read_rows(task.view, task.row_start, task.row_stop)
        np.testing.assert_array_equal(got["boxes"], _rows(task)["boxes"] * _rows(task)["valid"][:, None])
