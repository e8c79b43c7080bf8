"""``StreamingDataset`` on the real tiny Qwen2.5-VL processor and model, over JSONL, tar (and, where installed,
parquet and ``datasets``) shards with real PNG images: each rank reads its own shards, bad rows are named or
skipped, and a run resumed from a saved position (a DataLoader's, or ``QwenVLTrainer``'s checkpoint) trains on
exactly the batches of the uninterrupted run."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwenvl.data import BadSampleError, PackedCollator, StreamingDataset
from qwenvl.data.collators import STREAM_KEY, VISION_KEYS
from qwenvl.data.processor import load_processor
from qwenvl.fixtures import model_dir, tiny_model
from qwenvl.packing import SKIPPED_KEY

_LOADED: dict[str, tuple] = {}
SIZES = ((40, 30), (64, 64), (29, 100), (90, 45))  # (height, width)


def _load():
    if "qwen2_5_vl" not in _LOADED:
        _LOADED["qwen2_5_vl"] = (load_processor(model_dir("qwen2_5_vl")), tiny_model("qwen2_5_vl"))
    return _LOADED["qwen2_5_vl"]


def _row(n: int, image: str | None) -> dict:
    words = "word " * (n % 9 + 1)
    if image is None:
        return {"conversations": [{"from": "human", "value": f"count {n}"}, {"from": "gpt", "value": f"{n}: {words}"}]}
    ask = {"from": "human", "value": f"<image>\nwhat is {n}?"}
    return {"image": image, "conversations": [ask, {"from": "gpt", "value": f"shape {n} {words}"}]}


def _png(path: Path, k: int) -> Path:
    height, width = SIZES[k % len(SIZES)]
    Image.new("RGB", (width, height), (40 * k % 255, 90, 200 - 30 * k % 200)).save(path)
    return path


def _write_tar(path: Path, rows: list[dict], folder: Path) -> None:
    """A webdataset-style shard: <key>.json (the row, its image named by extension) and <key>.png."""
    with tarfile.open(path, "w") as tar:
        for i, row in enumerate(rows):
            row = dict(row)
            image = row.pop("image", None)
            members = [(".json", None)] + ([(".png", folder / image)] if image else [])
            if image:
                row["image"] = "png"
            for ext, source in members:
                data = json.dumps(row).encode() if source is None else source.read_bytes()
                info = tarfile.TarInfo(f"s{i:04d}{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _rows_of(shard: int, count: int) -> list[dict]:
    return [_row(100 * shard + i, f"im{(shard + i) % 4}.png" if (shard + i) % 3 else None) for i in range(count)]


def _shards(folder: Path, *, jsonl: int = 3, tars: int = 1, count: int = 7) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(4):
        _png(folder / f"im{k}.png", k)
    for s in range(jsonl):
        (folder / f"{s:02d}.jsonl").write_text("\n".join(json.dumps(r) for r in _rows_of(s, count)) + "\n")
    for s in range(jsonl, jsonl + tars):
        _write_tar(folder / f"{s:02d}.tar", _rows_of(s, count), folder)
    return folder


def _dataset(data, **kwargs) -> StreamingDataset:
    processor, model = _load()
    kwargs.setdefault("budget", 256)
    kwargs.setdefault("buffer", 5)
    return StreamingDataset(data, processor, model=model, **kwargs)


def _loader(dataset, workers: int):
    return torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=PackedCollator(), num_workers=workers)


def _take(dataset, workers: int, count: int, *, record: bool = True) -> list[dict]:
    batches = []
    for batch in _loader(dataset, workers):
        if record:
            for tag in batch[STREAM_KEY]:
                dataset.record(tag)
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def _assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        assert sorted(a) == sorted(b), f"batch {step}: keys"
        for key in ("input_ids", "labels", "attention_mask", "position_ids", *VISION_KEYS):
            if key in b:
                assert torch.equal(a[key], b[key]), f"batch {step}: {key}"
        assert a[STREAM_KEY] == b[STREAM_KEY], f"batch {step}: the rows' samples and positions"


def _keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for tag in b[STREAM_KEY] for k in json.loads(tag)["keys"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_yields_exactly_the_uninterrupted_batches(tmp_path, workers):
    """Cut at several batches (one inside a pass, one past a pass boundary of some worker): a new dataset given the
    state yields, batch for batch, what the uninterrupted one yielded after the cut."""
    data = _shards(tmp_path / "shards")
    whole = _take(_dataset(str(data)), workers, 30)
    keys = _keys(whole)
    assert len(keys) > len(set(keys)), "the run should go past a worker's pass"
    assert any(b["pixel_values"].numel() for b in whole if "pixel_values" in b)
    for cut in (4, 19):
        first = _dataset(str(data))
        _assert_same(_take(first, workers, cut), whole[:cut])
        state = json.loads(json.dumps(first.state_dict()))  # what the checkpoint stores
        resumed = _dataset(str(data))
        resumed.load_state_dict(state)
        _assert_same(_take(resumed, workers, 30 - cut), whole[cut:])


def test_each_rank_reads_its_own_shards_and_together_all(tmp_path):
    """Shard i is read on rank i % world, by DataLoader worker k % workers of the rank's k-th shard: one pass of
    every rank's workers gives each good row exactly once."""
    data = _shards(tmp_path / "shards", jsonl=5, tars=2, count=4)
    seen: dict[int, list[str]] = {}
    for rank in range(3):
        dataset = _dataset(str(data), rank=rank, world_size=3)
        assert [shard_id for shard_id, _ in dataset.rank_shards] == list(range(rank, 7, 3))
        rows = len(dataset.rank_shards) * 4
        batches = []
        for batch in _loader(dataset, 2):  # stop when every worker has finished its first pass
            batches.append(batch)
            tags = [json.loads(tag) for b in batches for tag in b[STREAM_KEY]]
            if len({k for t in tags for k in t["keys"]}) == rows and all(t["pass"] == 0 for t in tags):
                break
        seen[rank] = [k for k in _keys(batches)]
        assert len(seen[rank]) == rows == len(set(seen[rank])), f"rank {rank}: every row once"
        assert {int(k.split(":")[0]) % 3 for k in seen[rank]} == {rank}, f"rank {rank} read another rank's shard"
    everything = [k for keys in seen.values() for k in keys]
    assert sorted(everything) == sorted(f"{s}:{i}" for s in range(7) for i in range(4))
    with pytest.raises(Exception, match="7 shards for 8 ranks: rank 7 has none"):
        _dataset(str(data), rank=7, world_size=8)


def test_bad_rows_are_named_or_skipped(tmp_path):
    data = _shards(tmp_path / "shards", jsonl=1, tars=1, count=4)
    lines = (data / "00.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"image": "nope.png", "conversations": json.loads(lines[2])["conversations"]})
    (data / "00.jsonl").write_text("\n".join(lines) + "\n")
    with tarfile.open(data / "01.tar", "a") as tar:  # a sample without its JSON row, named by its key
        info = tarfile.TarInfo("orphan.png")
        info.size = (data / "im0.png").stat().st_size
        tar.addfile(info, io.BytesIO((data / "im0.png").read_bytes()))
    with pytest.raises(BadSampleError, match=r"00\.jsonl sample 2: image file .*nope\.png does not exist"):
        _take(_dataset(str(data / "00.jsonl")), 0, 10)
    with pytest.raises(BadSampleError, match=r"01\.tar sample 4 \(orphan\): no orphan\.json member in the tar"):
        _take(_dataset(str(data / "01.tar")), 0, 10)
    lenient = _dataset(str(data), skip_bad_samples=True)
    batches = []
    for batch in _loader(lenient, 0):  # the first pass
        if json.loads(batch[STREAM_KEY][0])["pass"]:
            break
        lenient.record(batch[STREAM_KEY][0])
        batches.append(batch)
    assert "0:2" not in _keys(batches) and len(_keys(batches)) == len(set(_keys(batches))) == 7
    assert lenient.skipped_rows == 2 and "2 bad rows skipped" in lenient.summary()


def test_a_row_that_fails_to_decode_stands_in_as_the_map_style_dataset_does(tmp_path):
    data = _shards(tmp_path / "shards", jsonl=1, tars=0, count=3)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    (data / "im1.png").write_bytes(buffer.getvalue()[:-40])  # the header is whole, the pixels are cut
    with pytest.raises(BadSampleError, match=r"00\.jsonl sample 1: .*im1\.png"):
        _take(_dataset(str(data)), 0, 1)
    batch = _take(_dataset(str(data), skip_bad_samples=True), 0, 1)[0]
    assert len(batch[SKIPPED_KEY]) == 1 and "00.jsonl sample 1:" in batch[SKIPPED_KEY][0]


def test_a_video_row_streams_by_its_container_header(tmp_path, monkeypatch):
    """A JSONL shard with a real mp4 video row: the stream learns the video's length from its container's header
    (``SupervisedDataset``'s video rule), so the video is decoded once, when its packed row goes out, and never to
    learn its length; the packed batches are exactly those of processing every row in full to learn its length."""
    pytest.importorskip("torchvision", reason="transformers' video processors need torchvision")
    pytest.importorskip("av", reason="the video rule reads headers with PyAV, and the test writes mp4 with it")
    import qwenvl.data.dataset as dataset_module
    from qwenvl.data.video_lengths import probe_video_rule
    from videos import write_mp4

    if (why := probe_video_rule(_load()[0])[1]).endswith("in this transformers release"):
        pytest.skip(f"every video row is processed in full here: {why}")  # 4.57: no replace_video_token
    data = _shards(tmp_path / "shards", jsonl=1, tars=0, count=6)
    write_mp4(data / "clip.mp4", 8, 4, 32, 48)
    lines = (data / "00.jsonl").read_text().splitlines()
    ask = {"from": "human", "value": "<video>\nwhat moves?"}
    lines.insert(2, json.dumps({"video": "clip.mp4", "conversations": [ask, {"from": "gpt", "value": "a square"}]}))
    (data / "00.jsonl").write_text("\n".join(lines) + "\n")
    decoded: list[int] = []
    load_video = dataset_module.load_video

    def counted(ref, path):
        decoded.append(ref.index)
        return load_video(ref, path)

    monkeypatch.setattr(dataset_module, "load_video", counted)

    processed = _take(_dataset(str(data), header_lengths=False), 0, 8, record=False)
    emitted = _keys(processed).count("0:2")
    assert emitted >= 2 and len(set(_keys(processed))) == 7, "the run should go past a pass"
    assert len(decoded) > emitted, "processed in full: decoded to learn its length too"
    decoded.clear()
    dataset = _dataset(str(data))
    header = _take(dataset, 0, 8, record=False)
    assert decoded == [2] * emitted, "decoded once per packed row it goes out in, never to learn its length"
    assert dataset._samples._video_rule is not None, "the video rule was declined on Qwen2.5-VL"
    assert any("pixel_values_videos" in b for b in header)
    _assert_same(header, processed)


def _same_rows_elsewhere(tmp_path, write) -> None:
    """The same rows through another reader give the same batches as the JSONL shards."""
    data = _shards(tmp_path / "shards", jsonl=2, tars=0, count=6)
    want = _take(_dataset(str(data)), 0, 8, record=False)
    other = write(data)
    got = _take(_dataset(other, media_root=data) if not isinstance(other, str) else _dataset(other), 0, 8, record=False)
    for a, b in zip(got, want):
        for key in ("input_ids", "labels", "attention_mask", "pixel_values"):
            if key in b:
                assert torch.equal(a[key], b[key]), key


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="parquet needs pyarrow (optional)")
def test_parquet_shards_read_the_same_rows_as_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(data: Path) -> str:
        out = tmp_path / "pq"
        out.mkdir()
        for s in range(2):
            rows = [json.loads(line) for line in (data / f"{s:02d}.jsonl").read_text().splitlines()]
            for row in rows:
                row["image"] = str(data / row["image"]) if "image" in row else None
            pq.write_table(pa.Table.from_pylist(rows), out / f"{s:02d}.parquet", row_group_size=4)
        return str(out)

    _same_rows_elsewhere(tmp_path, write)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs datasets (optional)")
@pytest.mark.parametrize("streaming", [False, True])
def test_a_datasets_dataset_reads_the_same_rows_as_jsonl(tmp_path, streaming):
    import datasets

    def write(data: Path):
        rows = [json.loads(line) for s in range(2) for line in (data / f"{s:02d}.jsonl").read_text().splitlines()]
        for row in rows:
            row.setdefault("image", None)
        dataset = datasets.Dataset.from_list(rows)
        return dataset.to_iterable_dataset(num_shards=2) if streaming else dataset

    if streaming:
        _same_rows_elsewhere(tmp_path, write)
    else:
        data = _shards(tmp_path / "shards", jsonl=2, tars=0, count=6)
        want = _take(_dataset(str(data)), 0, 8, record=False)
        got = _take(_dataset(write(data), media_root=data, rows_per_shard=6), 0, 8, record=False)
        for a, b in zip(got, want):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_a_trainer_resumed_from_its_checkpoint_trains_on_the_uninterrupted_batches(tmp_path):
    """``QwenVLTrainer`` saves the stream's position in each checkpoint (one JSON file per rank) and, resuming,
    puts the stream back there: steps 4-6 of the resumed run see exactly steps 4-6 of the uninterrupted one (two
    DataLoader workers, so the position is the workers' and the turn of the next one)."""
    pytest.importorskip("accelerate", reason="the Trainer needs the 'train' extra (accelerate)")
    from qwenvl.train.argument import TrainingArguments
    from qwenvl.train.checkpoint import STREAM_STATE
    from qwenvl.train.trainer import QwenVLTrainer

    class Recording(QwenVLTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            self.seen.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
            return super().training_step(model, inputs, *args, **kwargs)

    data = _shards(tmp_path / "shards")

    def train(out: Path, resume: str | None = None) -> list[dict]:
        processor, _ = _load()
        model = tiny_model("qwen2_5_vl")
        dataset = StreamingDataset(str(data), processor, model=model, budget=256, buffer=5)
        args = TrainingArguments(
            output_dir=str(out),
            max_steps=6,
            save_steps=3,
            per_device_train_batch_size=1,
            dataloader_num_workers=2,
            report_to="none",
            learning_rate=1e-3,
            seed=0,
            use_cpu=True,
            disable_tqdm=True,
            logging_steps=1,
            remove_unused_columns=False,
        )
        trainer = Recording(model=model, args=args, train_dataset=dataset, data_collator=PackedCollator())
        trainer.seen = []
        trainer.train(resume_from_checkpoint=resume)
        assert any("fill_ratio" in entry for entry in trainer.state.log_history)
        return trainer.seen

    whole = train(tmp_path / "whole")
    saved = tmp_path / "whole" / "checkpoint-3" / STREAM_STATE.format(rank=0)
    assert json.loads(saved.read_text())["workers"] == 2
    resumed = train(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-3"))
    assert len(whole) == 6 and len(resumed) == 3
    _assert_same(resumed, whole[3:])
    with pytest.raises(ValueError, match="holds no qwenvl_stream_rank0.json"):
        (tmp_path / "whole" / "checkpoint-6" / STREAM_STATE.format(rank=0)).unlink()
        train(tmp_path / "again", resume=str(tmp_path / "whole" / "checkpoint-6"))
