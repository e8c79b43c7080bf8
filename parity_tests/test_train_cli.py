"""``qwenvl train`` end to end on the embedded default (tiny Qwen2.5-VL, demo data, CPU)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

pytest.importorskip("accelerate", reason="the Trainer needs the 'train' extra (accelerate)")

from qwenvl.cli import main as qwenvl_main  # noqa: E402
from qwenvl.data.processor import load_processor  # noqa: E402
from qwenvl.fixtures import demo_data_path, model_dir  # noqa: E402

FAST = ["--model_max_length", "256", "--learning_rate", "3e-3", "--seed", "0", "--disable_tqdm", "True"]


def _train(tmp_path, name, *args) -> tuple[int, dict]:
    out = tmp_path / name
    code = qwenvl_main(["train", "--output_dir", str(out), *FAST, *args])
    state = out / "trainer_state.json"
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not state.exists() and checkpoints:
        state = checkpoints[-1] / "trainer_state.json"
    return code, (json.loads(state.read_text()) if state.exists() else {})


def _weights(path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForImageTextToText.from_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_default_run_trains_and_leaves_a_checkpoint_that_reloads(tmp_path):
    code, state = _train(tmp_path, "out", "--max_steps", "8")
    assert code == 0
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 8
    assert sum(losses[-2:]) < sum(losses[:2]), f"loss did not decrease: {losses}"
    trained, initial = _weights(tmp_path / "out"), _weights(model_dir("qwen2_5_vl"))
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained), "nothing was trained"
    processor = load_processor(tmp_path / "out")
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == load_processor(model_dir("qwen2_5_vl")).tokenizer.convert_tokens_to_ids("<|image_pad|>")


@pytest.mark.slow
def test_compiled_regions_and_fused_loss_train_like_the_plain_run(tmp_path):
    # --compile and --fused_cross_entropy change how the step is computed, not what: the logged losses
    # (transformers rounds them to 4 decimals) agree with the plain run's to that rounding.
    plain = _train(tmp_path, "plain", "--max_steps", "3")
    fast = _train(tmp_path, "fast", "--max_steps", "3", "--compile", "True", "--fused_cross_entropy", "True")
    assert plain[0] == 0 and fast[0] == 0
    losses = [[e["loss"] for e in run[1]["log_history"] if "loss" in e] for run in (plain, fast)]
    assert len(losses[0]) == len(losses[1]) == 3
    for a, b in zip(*losses):
        assert abs(a - b) <= 1e-4 + 1e-6, losses


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(tmp_path):
    common = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    assert _train(tmp_path, "whole", *common)[0] == 0
    # every checkpoint reloads on its own, processor included (the Trainer alone saves none there)
    for step in (2, 4):
        assert (tmp_path / "whole" / f"checkpoint-{step}" / "tokenizer.json").is_file()
        assert load_processor(tmp_path / "whole" / f"checkpoint-{step}").tokenizer is not None
    # the interrupted run: the same run picked up from its step-2 checkpoint, in a folder of its own
    assert _train(tmp_path, "resumed", *common, "--resume_from_checkpoint", str(tmp_path / "whole" / "checkpoint-2"))[0] == 0
    # resumed, not restarted: it saved only the step-4 checkpoint (a fresh run would save step 2 as well)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-4"]
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_lora_trains_adapters_only(tmp_path):
    from peft import PeftModel

    code, state = _train(tmp_path, "lora", "--max_steps", "2", "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8")
    assert code == 0 and len([e for e in state["log_history"] if "loss" in e]) == 2
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    base = transformers.AutoModelForImageTextToText.from_pretrained(model_dir("qwen2_5_vl"))
    initial = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = PeftModel.from_pretrained(base, tmp_path / "lora")
    assert any("lora_" in n for n, _ in model.named_parameters())
    # the projector was trained in full (--tune_mm_mlp defaults to True): the checkpoint must carry it
    merged = model.merge_and_unload()
    moved = [n for n, p in merged.named_parameters() if "merger" in n and not torch.equal(p, initial[n])]
    assert moved, "the trained projector did not reach the LoRA checkpoint"


def test_bad_data_stops_before_training_naming_file_and_row(tmp_path, capsys):
    rows = json.loads(demo_data_path().read_text())
    rows = [r for r in rows if "video" not in r][:5]
    for r in rows:
        for key in ("image",):
            if key in r:
                r[key] = str(demo_data_path().parent / r[key]) if isinstance(r[key], str) else [str(demo_data_path().parent / p) for p in r[key]]
    rows[3]["conversations"] = rows[3]["conversations"][:1]
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(rows))
    code = qwenvl_main(["train", "--output_dir", str(tmp_path / "o"), "--data_path", str(data), "--max_steps", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{data} sample 3: no assistant" in err and "--skip_bad_samples" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("checkpoint-*"))


def test_a_sample_that_fails_to_decode_in_training_is_skipped_and_counted(tmp_path, capsys):
    """Its header passes the checks up front; with --skip_bad_samples the run trains through it, and the count
    reaches the final summary."""
    import io

    from PIL import Image

    rows = [r for r in json.loads(demo_data_path().read_text()) if "video" not in r and "image" in r][:3]
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:-40])
    for i, r in enumerate(rows):
        r["image"] = str(tmp_path / "cut.png") if i == 1 else str(demo_data_path().parent / r["image"])
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    args = ["--data_path", str(data), "--skip_bad_samples", "True", "--num_train_epochs", "1", "--save_strategy", "no"]
    assert _train(tmp_path, "o", *args)[0] == 0
    assert "skipped in training: 1 samples failed to decode" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pad_to_multiple_of", "0"], "--pad_to_multiple_of must be a positive number of tokens, got 0"),
        (["--packing_convention", "flat"], "--packing_convention 'flat' is not one of upstream, hf_positions, hf_kwargs"),
        (["--dtype", "fp8"], "--dtype 'fp8' is not one of float32, bfloat16, float16"),
        (["--backend", "nope"], "--backend 'nope' is not one of auto, "),
        (["--pack_budget", "100", "--model_max_length", "200"], "--pack_budget 100 is below --model_max_length 200"),
        (["--tune_mm_llm", "False", "--tune_mm_mlp", "False"], "nothing to train"),
        (["--per-device-train-batch-size", "4"], "with packing a batch is one packed row"),
        (["--linear_backend", "nope"], "--linear_backend 'nope' is not one of auto, segments, batched, torch, fla"),
        (["--compile", "True", "--torch_compile", "True"], "--compile and --torch_compile both compile"),
        (["--streaming", "True"], "--streaming needs --max_steps: a stream has no length"),
        (["--streaming", "True", "--max_steps", "2", "--packing", "False"], "--streaming packs rows online"),
        (["--streaming", "True", "--max_steps", "2", "--stream_buffer", "1"], "--stream_buffer must hold at least 2"),
    ],
)
def test_bad_options_are_refused_up_front(tmp_path, capsys, args, message):
    # TrainingArguments(torch_compile=True) exports ACCELERATE_DYNAMO_BACKEND into os.environ, and every later
    # Trainer in this process then compiles its model (the gloo test's one-process reference got other loss bits
    # whenever this test had run before it in the same worker): the environment is put back afterwards.
    saved = dict(os.environ)
    try:
        assert qwenvl_main(["train", "--output-dir", str(tmp_path / "o"), *args]) == 2
    finally:
        os.environ.clear()
        os.environ.update(saved)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists(), "refused before anything ran"


def test_bad_data_files_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert qwenvl_main(["train", "--output_dir", str(tmp_path / "o"), "--data_path", str(bad)]) == 2
    assert f"{bad}: not valid JSON" in capsys.readouterr().err
    assert qwenvl_main(["train", "--output_dir", str(tmp_path / "o"), "--data_path", f"{bad}%x"]) == 2
    assert "sampling ratio after % must be a number" in capsys.readouterr().err


def _shard_folder(tmp_path):
    """The demo's image rows as two JSONL shards and a webdataset-style tar shard (<key>.json + <key>.png)."""
    import io
    import tarfile

    rows = [r for r in json.loads(demo_data_path().read_text()) if "video" not in r and not isinstance(r.get("image"), list)]
    folder = tmp_path / "shards"
    folder.mkdir()
    for r in rows:
        if "image" in r:
            r["image"] = str(demo_data_path().parent / r["image"])
    for s in range(2):
        (folder / f"{s}.jsonl").write_text("\n".join(json.dumps(r) for r in rows[s::3]))
    with tarfile.open(folder / "2.tar", "w") as tar:
        for i, r in enumerate(rows[2::3]):
            image = r.pop("image", None)
            members = {"json": json.dumps({**r, **({"image": "png"} if image else {})}).encode()}
            if image:
                members["png"] = open(image, "rb").read()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"row{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


def test_streaming_trains_saves_the_position_and_resumes(tmp_path, capsys):
    """qwenvl train --streaming on a folder of shards: each checkpoint holds the stream's position, the run resumed
    from one goes on (it saves only the later checkpoint), and the summary gives the fill ratio."""
    folder = _shard_folder(tmp_path)
    common = ["--streaming", "True", "--data_path", str(folder), "--max_steps", "2", "--save_steps", "1"]
    assert _train(tmp_path, "whole", *common)[0] == 0
    assert "fill ratio" in capsys.readouterr().out
    state = json.loads((tmp_path / "whole" / "checkpoint-1" / "qwenvl_stream_rank0.json").read_text())
    assert state["shards"] == [str(folder / name) for name in ("0.jsonl", "1.jsonl", "2.tar")] and state["streams"]
    resume = ["--resume_from_checkpoint", str(tmp_path / "whole" / "checkpoint-1")]
    code, trainer_state = _train(tmp_path, "resumed", *common, *resume)
    assert code == 0 and sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-2"]
    assert [e["step"] for e in trainer_state["log_history"] if "loss" in e] == [1, 2]  # step 1 from the checkpoint
    assert all("fill_ratio" in e for e in trainer_state["log_history"] if "loss" in e)


def test_a_streamed_data_path_without_streaming_is_refused(tmp_path, capsys):
    folder = _shard_folder(tmp_path)
    for path in (str(folder), str(folder / "*.jsonl"), str(folder / "2.tar")):
        assert qwenvl_main(["train", "--output_dir", str(tmp_path / "o"), "--data_path", path]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "read as a stream: add --streaming" in err[0], err
    assert qwenvl_main(["train", "--output_dir", str(tmp_path / "o"), "--streaming", "True", "--max_steps", "1",
                        "--data_path", str(folder / "nothing-*.jsonl")]) == 2
    assert "the pattern matches no file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
