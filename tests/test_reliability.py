"""Fault injection and bad input for training: non-finite values stop the run, checkpoints are atomic and verified
before `--resume` loads anything, a checkpoint of another recipe is refused, `--overwrite` clears the old run's
checkpoints; image paths stay in their folder, and bad evaluation, demo and quick-start arguments are named before a
model loads. Each test names the on-disk state a real fault leaves (see docs/reliability.md)."""

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerCallback

import vlatent.training.trainer as trainer_module
from vlatent.data import RecordError, load_records
from vlatent.training import LatentTrainer, load_recipe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train.sft import load_model, prepare_output, run, seed_run, training_arguments  # noqa: E402
from train.sft import main as sft  # noqa: E402
from data_builders.__main__ import main as build_data  # noqa: E402

from test_model import write_records  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("data"), [("a", 1, True), ("b", 0, True), ("c", 1, False)])


def recipe(tmp_path, base, data, **training):
    """A 3-step run saving a checkpoint after every step."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(dict(
        model=str(base), method="mirage", data={"train": str(data)},
        training={"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 1, "learning_rate": 1e-3,
                  "max_steps": 3, "save_strategy": "steps", "save_steps": 1, "logging_steps": 1, "seed": 0,
                  "disable_tqdm": True, **training})))
    return str(path)


def train_in_process(cfg, trainer_class=LatentTrainer, callbacks=(), overrides=()) -> int:
    """What train/sft.py's main does, with a trainer class or callbacks of the test's (the faults it injects)."""
    r = load_recipe(cfg, list(overrides))
    out = Path(r.training["output_dir"])
    last = prepare_output(out, False, True, r, 1)
    seed_run(r)
    model, _ = load_model(r, 0)
    trainer = trainer_class(model=model, args=training_arguments(r), train_dataset=load_records(r.data.train),
                            data_collator=model.collator(), callbacks=list(callbacks))
    return run(trainer, out, r, 1, last, title="test")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def all_finite(folder: Path) -> bool:
    return all(torch.isfinite(v).all() for v in weights(folder).values())


def test_exploding_loss_exits_1_and_saves_no_final_model(tmp_path, tiny_base, data, capsys):
    """A learning rate of 1e30 (finite, so the recipe checks let it through) blows the weights up in one step: the
    next loss is not finite, the run exits 1 with one line naming the step, and no final model is written."""
    cfg = recipe(tmp_path, tiny_base, data, learning_rate=1e30, lr_scheduler_type="constant", optim="sgd",
                 save_strategy="no")
    assert sft(["--config", cfg]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "training stopped at step" in err[0] and "not saved" in err[0], err
    assert "no checkpoint was saved" in err[0]
    assert not (tmp_path / "out" / "model.safetensors").exists()


class Poison(TrainerCallback):
    """Turns one weight into NaN after ``step`` (a bad optimizer update, a flipped bit)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")


def test_nan_weights_are_never_checkpointed_and_the_last_good_checkpoint_stays(tmp_path, tiny_base, data, capsys):
    """Weights that turn NaN after step 2: checkpoint-2 is not written, checkpoint-1 stays complete and finite, the
    run exits 1 naming checkpoint-1, and no final model is saved."""
    cfg = recipe(tmp_path, tiny_base, data)
    assert train_in_process(cfg, callbacks=[Poison(2)]) == 1
    out = tmp_path / "out"
    err = capsys.readouterr().err
    assert "not finite" in err and f"the last good checkpoint is {out / 'checkpoint-1'}" in err, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert all_finite(out / "checkpoint-1") and (out / "checkpoint-1" / trainer_module.MANIFEST).is_file()
    assert not (out / "model.safetensors").exists()


class Killed(BaseException):
    """The process dying at a kill point: nothing after it runs (not caught by the Trainer or by run())."""


class KilledTrainer(LatentTrainer):
    """Dies while saving checkpoint-``KILL_STEP`` at ``kill_point``; 'during' leaves the file half written."""

    kill_point = ""
    KILL_STEP = 2

    def _kill(self, point, folder=None, name=None):
        if self.state.global_step == self.KILL_STEP and self.kill_point == point:
            if folder is not None:
                path = Path(folder) / name
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            raise Killed(point)

    def save_model(self, output_dir=None, _internal_call=False):
        self._kill("before weights")
        super().save_model(output_dir, _internal_call)
        self._kill("during weights", output_dir, "model.safetensors")
        self._kill("after weights")

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        self._kill("during optimizer", output_dir, "optimizer.pt")
        self._kill("after optimizer")

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        self._kill("before trainer state")


KILL_POINTS = ["before weights", "during weights", "after weights", "during optimizer", "after optimizer",
               "before trainer state", "after trainer state"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_base, data):
    """The same 3-step run, never interrupted: its folder."""
    tmp = tmp_path_factory.mktemp("straight")
    assert sft(["--config", recipe(tmp, tiny_base, data)]) == 0
    return tmp / "out"


def logged(out: Path) -> dict[int, dict]:
    """The training logs of a run by step: the loss and the named losses."""
    history = json.loads((out / "log_history.json").read_text())
    return {e["step"]: {k: v for k, v in e.items() if k.startswith("loss")} for e in history if "loss" in e}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_kill_while_saving_leaves_no_checkpoint_that_resume_picks(tmp_path, tiny_base, data, straight, point,
                                                                    monkeypatch, capsys):
    """Killed while writing checkpoint-2 (before, during, after the weights, the optimizer states, the trainer
    state): no checkpoint-2 appears, `--resume` says it ignores the interrupted save, continues from checkpoint-1,
    and ends on the weights of a run never interrupted."""
    cfg = recipe(tmp_path, tiny_base, data)
    if point == "after trainer state":  # everything written, the manifest not yet
        write_manifest = trainer_module.write_manifest

        def killed_manifest(folder, info):
            if folder.name == f"checkpoint-{KilledTrainer.KILL_STEP}":
                raise Killed(point)
            write_manifest(folder, info)
        monkeypatch.setattr(trainer_module, "write_manifest", killed_manifest)
    KilledTrainer.kill_point = point
    with pytest.raises(Killed):
        train_in_process(cfg, KilledTrainer)
    monkeypatch.undo()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"], point
    staged = (out / trainer_module.STAGING).is_dir()
    assert staged or point == "before weights"
    capsys.readouterr()
    assert sft(["--config", cfg, "--resume"]) == 0
    assert ("ignoring" in capsys.readouterr().err) == staged
    resumed, expected = weights(out), weights(straight)
    for k in expected:
        torch.testing.assert_close(resumed[k], expected[k], atol=1e-6, rtol=1e-5, msg=k)
    after, before = logged(out), logged(straight)  # after the resume the curve is the uninterrupted one
    assert sorted(after) == [1, 2, 3], after
    for step in after:
        assert after[step] == pytest.approx(before[step], rel=1e-3, abs=1e-4), (step, after, before)
    assert not (out / trainer_module.STAGING).exists()


def test_a_checkpoint_without_manifest_is_skipped_with_what_to_do(tmp_path, tiny_base, data, capsys):
    """A checkpoint-N folder without a manifest (a save by an older version, or a copy cut short) is not resumed:
    the message names it and says to delete it; an earlier complete one is used instead."""
    cfg = recipe(tmp_path, tiny_base, data, max_steps=2)
    assert sft(["--config", cfg]) == 0
    (tmp_path / "out" / "checkpoint-2" / trainer_module.MANIFEST).unlink()
    assert prepare_output(tmp_path / "out", True, False, load_recipe(cfg), 1) == str(tmp_path / "out" / "checkpoint-1")
    err = capsys.readouterr().err
    assert "checkpoint-2" in err and "delete it" in err, err


class Evil:
    """Unpickling this touches ``marker``: the proof that a file was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_resume_refuses_an_altered_or_added_file_before_unpickling_it(tmp_path, tiny_base, data, capsys):
    """A tampered optimizer.pt (a pickle that runs code) or an extra .pt in the newest checkpoint: `--resume`
    exits 2 naming the file, and the pickle never runs."""
    cfg = recipe(tmp_path, tiny_base, data, max_steps=2)
    assert sft(["--config", cfg]) == 0
    ckpt, marker = tmp_path / "out" / "checkpoint-2", tmp_path / "unpickled"
    original = (ckpt / "optimizer.pt").read_bytes()
    torch.save({"state": Evil(marker)}, ckpt / "optimizer.pt", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    capsys.readouterr()
    assert sft(["--config", cfg, "--resume"]) == 2
    assert "optimizer.pt does not match its hash" in capsys.readouterr().err
    (ckpt / "optimizer.pt").write_bytes(original)
    torch.save(Evil(marker), ckpt / "extra.pt")
    assert sft(["--config", cfg, "--resume"]) == 2
    assert "extra.pt is not in the manifest" in capsys.readouterr().err
    (ckpt / "extra.pt").unlink()
    (ckpt / "model.safetensors").unlink()
    assert sft(["--config", cfg, "--resume"]) == 2
    assert "model.safetensors is missing" in capsys.readouterr().err
    assert not marker.exists()


def test_resume_refuses_a_checkpoint_of_another_recipe_and_overwrite_clears_it(tmp_path, tiny_base, data, capsys):
    """An old run's folder: `--resume` with a changed recipe names the changed key and exits 2 (another process
    count is refused too); `--overwrite`
    starts over and removes the old run's checkpoints, so a later `--resume` cannot continue the old run."""
    cfg = recipe(tmp_path, tiny_base, data, max_steps=2)
    assert sft(["--config", cfg]) == 0
    capsys.readouterr()
    assert sft(["--config", cfg, "--resume", "--set", "training.learning_rate=0.01"]) == 2
    err = capsys.readouterr().err
    assert "another recipe" in err and "training.learning_rate: 0.001 -> 0.01" in err, err
    with pytest.raises(ValueError, match="trained with 1 processes, this launch has 2; .* relaunch with 1"):
        prepare_output(tmp_path / "out", True, False, load_recipe(cfg), 2)
    assert sft(["--config", cfg, "--overwrite", "--set", "training.save_strategy=no"]) == 0
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    assert sft(["--config", cfg, "--resume"]) == 2
    assert "no checkpoint-* directory in" in capsys.readouterr().err


def test_output_dir_that_is_a_file_is_named_before_the_model_loads(tmp_path, tiny_base, data, capsys):
    cfg = recipe(tmp_path, tiny_base, data)
    (tmp_path / "out").write_text("not a folder")
    assert sft(["--config", cfg]) == 2
    assert f"output_dir {str(tmp_path / 'out')!r} is a file" in capsys.readouterr().err


def test_read_only_output_dir_is_named_before_the_model_loads(tmp_path, tiny_base, data, capsys):
    cfg = recipe(tmp_path, tiny_base, data)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    mounted = False
    try:
        if os.access(out, os.W_OK):  # root writes a read-only folder anyway: mount it read-only instead
            mounted = subprocess.run(["mount", "--bind", str(out), str(out)], capture_output=True).returncode == 0
            if not mounted or subprocess.run(["mount", "-o", "remount,bind,ro", str(out)],
                                             capture_output=True).returncode:
                pytest.skip("this user writes read-only folders and cannot mount one read-only")
        assert sft(["--config", cfg]) == 2
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=True)
        out.chmod(0o700)
    err = capsys.readouterr().err
    assert f"output_dir {str(out)!r} cannot be written" in err
    assert "trainable" not in err  # refused before the model loaded


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: image paths, image sizes, text encodings, turn order


def one_record(folder: Path, image: str = "a.png", text: str = "What colour?", user: bool = True) -> Path:
    """``folder/train.jsonl`` holding one record whose image path is ``image``; a.png exists beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (28, 28), "red").save(folder / "a.png")
    turns = [{"role": "user", "content": [{"type": "image", "image": 0}, {"type": "text", "text": text}]}][:int(user)]
    record = {"id": "r1", "images": [image], "messages": [
        *turns, {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]}
    path = folder / "train.jsonl"
    path.write_text(json.dumps(record) + "\n")
    return path


def rejects(path, match, **kwargs):
    with pytest.raises(RecordError) as e:
        load_records(path, **kwargs)
    assert match in str(e.value), str(e.value)
    return str(e.value)


def test_record_images_stay_in_the_dataset_folder_unless_allowed(tmp_path):
    """`../`, an absolute path and a symlink that lead out of the dataset folder are refused, naming the record and
    the field; allow_outside (sft's --allow-outside) lets that folder in."""
    outside = tmp_path / "private"
    outside.mkdir()
    Image.new("RGB", (28, 28)).save(outside / "secret.png")
    data = tmp_path / "data"
    for image in ("../private/secret.png", str(outside / "secret.png"), "link.png"):
        path = one_record(data, image)
        (data / "link.png").unlink(missing_ok=True)
        (data / "link.png").symlink_to(outside / "secret.png")
        err = rejects(path, "lies outside the dataset folder")
        assert "record 'r1'" in err and "images[0]" in err and "--allow-outside" in err
        assert load_records(path, allow_outside=[outside])[0]["images"] == [str(outside / "secret.png")]
    assert load_records(one_record(data, str(data / "a.png")))[0]["images"] == [str(data / "a.png")]


def test_record_images_over_the_pixel_cap_or_aspect_ratio_are_named(tmp_path):
    """A 42-megapixel PNG of a few KB (over the 40 MP default), a cap set lower, and a 3000x8 strip."""
    data = tmp_path / "data"
    Image.new("1", (7000, 6000)).save(data.mkdir() or data / "big.png")
    assert (data / "big.png").stat().st_size < 100_000
    rejects(one_record(data, "big.png"), "7000x6000 pixels, over the 40,000,000-pixel limit")
    path = one_record(data)
    rejects(path, "28x28 pixels, over the 700-pixel limit", max_image_pixels=700)
    assert load_records(path, max_image_pixels=784)
    Image.new("RGB", (3000, 8)).save(data / "strip.png")
    rejects(one_record(data, "strip.png"), "aspect ratio over 200")


def test_bad_text_and_turn_order_are_named(tmp_path):
    """A non-UTF-8 byte (line named), a lone UTF-16 surrogate (field named), an assistant turn with no user turn."""
    data = tmp_path / "data"
    path = one_record(data)
    path.write_bytes(path.read_bytes() + path.read_bytes().replace(b'"r1"', b'"r2"').replace(b"colour", b"col\xffur"))
    rejects(path, "line 2: line: byte")
    path = one_record(data, text="\ud800")
    assert "\\ud800" in path.read_text()
    rejects(path, "messages[0].content[1].text: character 0 is a lone UTF-16 surrogate")
    rejects(one_record(data, user=False), "messages: the first assistant turn has no user turn before it")


def test_an_empty_train_split_is_named_before_the_model_loads(tmp_path, tiny_base, capsys):
    (tmp_path / "train.jsonl").write_text("")
    assert sft(["--config", recipe(tmp_path, "/no/model/there", tmp_path / "train.jsonl")]) == 2
    assert "holds no records" in capsys.readouterr().err


def test_converters_copy_only_real_images_from_the_image_root(tmp_path, capsys):
    """An LLaVA record naming an absolute path, a `../` path or a non-image inside the root: the build stops naming
    the record (nothing copied, even with --skip-bad); --allow-outside lets a folder in."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("root:x:0:0")
    Image.new("RGB", (28, 28)).save(outside / "pic.png")
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.png").write_text("not an image")

    def source(image):
        path = src / "llava.jsonl"
        path.write_text(json.dumps({"id": "r1", "image": image, "conversations": [
            {"from": "human", "value": "<image> What?"}, {"from": "gpt", "value": "Red."}]}) + "\n")
        return str(path)

    for i, (image, match) in enumerate(((str(outside / "secret.txt"), "lies outside the image root"),
                                        ("../outside/secret.txt", "lies outside the image root"),
                                        ("notes.png", "is not a readable image"))):
        out = tmp_path / f"out{i}"
        assert build_data(["llava", "--source", source(image), "--out", str(out)]) == 2
        assert match in capsys.readouterr().err
        assert build_data(["llava", "--source", source(image), "--out", str(out), "--skip-bad", "--overwrite"]) == 0
        assert not any((out / "images").glob("*"))
    assert build_data(["llava", "--source", source(str(outside / "pic.png")), "--out", str(out), "--overwrite",
                       "--allow-outside", str(outside), "--split", "1,0,0"]) == 0
    assert len(list((out / "images").iterdir())) == 1


def test_evaluation_during_training_reports_eval_loss_and_loads_the_best_checkpoint(tmp_path, tiny_base, data):
    """data.eval with eval_strategy: an eval_loss at each evaluation; load_best_model_at_end with a metric where
    higher is better (so the best is the first evaluation, not the last) ends on that checkpoint's weights."""
    cfg = recipe(tmp_path, tiny_base, data, max_steps=4, save_steps=2, eval_strategy="steps", eval_steps=2,
                 load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    assert sft(["--config", cfg, "--set", f"data.eval={data}"]) == 0
    out = tmp_path / "out"
    evals = [e for e in json.loads((out / "log_history.json").read_text()) if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4] and all(e["eval_loss"] > 0 for e in evals), evals
    best = 2 if evals[0]["eval_loss"] >= evals[1]["eval_loss"] else 4
    final, kept, other = weights(out), weights(out / f"checkpoint-{best}"), weights(out / f"checkpoint-{6 - best}")
    assert all(torch.equal(final[k], kept[k]) for k in final)
    assert any(not torch.equal(final[k], other[k]) for k in final)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation, validation, the demo and the quick start: confined images, arguments checked before the model loads


def outside_images(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """(data folder, a private folder beside it, image paths leading there: `../`, absolute, a symlink)."""
    outside, data = tmp_path / "private", tmp_path / "data"
    outside.mkdir()
    data.mkdir()
    Image.new("RGB", (28, 28), "red").save(outside / "secret.png")
    (data / "link.png").symlink_to(outside / "secret.png")
    return data, outside, ["../private/secret.png", str(outside / "secret.png"), "link.png"]


def test_eval_images_stay_in_the_data_folder_unless_allowed(tmp_path, monkeypatch, capsys):
    """MMMU `{"path": ...}` cells (parquet), MMStar paths (jsonl) and synthetic records that lead out of the data
    folder are refused naming the file, row and column, before the model loads; --allow-outside lets the folder in.
    A name that is not in the data folder is never read from the working folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from eval.benchmarks import BENCHMARKS, EvalError, load_examples
    from eval.run import main as evaluate_cli
    from test_eval import MMMU_SCHEMA, mmmu_rows, mmstar_rows

    data, outside, paths = outside_images(tmp_path)
    mmmu, star = data / "mmmu.parquet", data / "mmstar.jsonl"
    for image in paths:
        row = {**mmmu_rows("Art", 1)[0], "image_1": {"bytes": None, "path": image}, "image_2": None}
        pq.write_table(pa.Table.from_pylist([row], schema=MMMU_SCHEMA), mmmu)
        star.write_text(json.dumps({**mmstar_rows(1)[0], "image": image}) + "\n")
        maze = one_record(data, image)
        maze.write_text(json.dumps({**json.loads(maze.read_text()), "task": "maze", "answer": "red"}) + "\n")
        for bench, source, split, culprit in (("mmmu", mmmu, "validation", "mmmu.parquet row 0: image_1: "),
                                              ("mmstar", star, "val", "mmstar.jsonl row 0: image: "),
                                              ("maze", data, "train", "record 'r1'")):
            with pytest.raises(EvalError) as e:
                load_examples(BENCHMARKS[bench], str(source), split)
            assert culprit in str(e.value) and "lies outside the" in str(e.value), str(e.value)
            assert "--allow-outside" in str(e.value)
            allowed = load_examples(BENCHMARKS[bench], str(source), split, allow_outside=[outside])[0]
            assert [Path(p).resolve() for p in allowed.images] == [(outside / "secret.png").resolve()], allowed.images
            assert allowed.open_images()[0].getpixel((0, 0)) == (255, 0, 0)
    assert evaluate_cli(["--model", str(tmp_path / "no-model"), "--bench", "mmstar", "--data", str(star), "--out",
                         str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "mmstar.jsonl row 0: image: 'link.png' lies outside the data folder" in err, err
    assert "not a model directory" not in err  # the data was read first
    monkeypatch.chdir(outside)  # a name that is not in the data folder but is in the working folder
    star.write_text(json.dumps({**mmstar_rows(1)[0], "image": "secret.png"}) + "\n")
    with pytest.raises(Exception, match="'secret.png' is neither an existing image file nor base64"):
        load_examples(BENCHMARKS["mmstar"], str(star), "val")[0].open_images()


def test_validate_reads_images_outside_the_dataset_only_with_allow_outside(tmp_path, capsys):
    """`build-data validate` named --allow-outside in its error but did not take it."""
    data, outside, paths = outside_images(tmp_path)
    for image in paths:
        one_record(data, image)
        assert build_data(["validate", str(data)]) == 2
        err = capsys.readouterr().err
        assert "record 'r1'" in err and "images[0]" in err and "lies outside the dataset folder" in err, err
        assert build_data(["validate", str(data), "--allow-outside", str(outside)]) == 0
        assert "ok: 1 records in 1 split(s)" in capsys.readouterr().out


def test_eval_arguments_data_and_run_json_are_checked_before_the_model_loads(tmp_path, capsys):
    """`--device banana` (and `meta`), a corrupt run.json being resumed, a run.json of other settings and a --data typo
    are each one line naming the culprit, with a model path that does not exist: had the model loaded first, the
    error would name it. The predictions in the folder are left as they were."""
    from eval.run import main as evaluate_cli
    from test_eval import mmstar_rows, write_mmstar

    data, out = write_mmstar(tmp_path / "mmstar", mmstar_rows(2)), tmp_path / "out"
    args = ["--model", str(tmp_path / "no-model"), "--bench", "mmstar", "--out", str(out)]

    def error(*extra) -> str:
        assert evaluate_cli([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert "not a model directory" not in err and len([x for x in err.splitlines() if "error:" in x]) == 1, err
        return err

    assert "argument --device: 'banana' is not a device of this machine" in error("--data", str(data), "--device",
                                                                                  "banana")
    assert "argument --device: 'meta' holds no data" in error("--data", str(data), "--device", "meta")
    out.mkdir()
    (out / "run.json").write_text('{"model": ')  # cut short
    (out / "predictions.jsonl").write_text('{"id": "0", "error": null}\n')
    assert f"{out / 'run.json'} is corrupt" in error("--data", str(data))
    (out / "run.json").write_text("[]")
    assert f"{out / 'run.json'} is corrupt" in error("--data", str(data))
    (out / "run.json").write_text(json.dumps({"bench": "mmstar", "data": str(data.resolve()), "split": "val",
                                              "prompt": "official", "latent": "auto", "max_new_tokens": 64,
                                              "images": "on"}))
    err = error("--data", str(data), "--max-new-tokens", "32")  # a rerun with other settings, found before the model
    assert "holds a run with other settings (max_new_tokens: 64 there, 32 now)" in err, err
    assert (out / "predictions.jsonl").read_text() == '{"id": "0", "error": null}\n'
    assert "--data 'mmstr.parquet': no such file or folder" in error("--data", "mmstr.parquet", "--out",
                                                                      str(tmp_path / "new"))


def test_demo_port_and_quickstart_n_are_checked_before_anything_loads(tmp_path, capsys):
    """`vlatent demo --port 70000` (bind() raised after the model loaded) and `vlatent quickstart --n 3` (the 80/10/10
    split of 3 has an empty test split, found after training three models): refused by the argument parser; a port
    in use (found after the model loaded too): one error line before the model is looked for."""
    from demo.app import main as demo
    from vlatent.cli import main as vlatent_main

    with pytest.raises(SystemExit) as e:
        demo(["--model", str(tmp_path / "no-model"), "--port", "70000"])
    assert e.value.code == 2 and "argument --port: expected a TCP port from 1 to 65535, got '70000'" in \
        capsys.readouterr().err
    with socket.socket() as held:  # a port another server holds: refused before the (missing) model is looked for
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        assert demo(["--model", str(tmp_path / "no-model"), "--port", str(taken)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot serve on 127.0.0.1:{taken}" in err and "no-model" not in err, err
    for n in (5, 6):  # the builders' split: 5 examples leave the test split empty, 6 do not
        assert build_data(["vsp", "--out", str(tmp_path / f"vsp{n}"), "--n", str(n), "--size", "4"]) == 0
        assert bool((tmp_path / f"vsp{n}" / "test.jsonl").read_text()) == (n == 6)
    for n in ("3", "5", "-1"):
        with pytest.raises(SystemExit) as e:
            vlatent_main(["quickstart", "--n", n, "--out", str(tmp_path / "qs")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument --n: expected at least 6 examples, got '{n}'" in err, err
        assert "test split empty" in err and not (tmp_path / "qs").exists()
