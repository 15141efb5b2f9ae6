"""vlatent as a library: a wheel installed in a fresh virtualenv runs every subcommand from any folder, with the
recipes, DeepSpeed configs and tiny base it ships, and puts no generic top-level name into site-packages."""

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def source_tree(dest: Path) -> Path:
    """The checkout's files (tracked, and new ones git does not ignore) copied to ``dest``: what a clone builds."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    with tarfile.open(dest.with_suffix(".tar"), "w") as tar:
        for f in files:
            if f and (ROOT / f).is_file():
                tar.add(ROOT / f, arcname=f)
    with tarfile.open(dest.with_suffix(".tar")) as tar:
        tar.extractall(dest, filter="data")
    return dest


def run(cmd, cwd, env, timeout=600):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.mark.slow
def test_wheel_runs_every_subcommand_from_any_folder(tmp_path):
    src, wheels, venv, work = source_tree(tmp_path / "src"), tmp_path / "wheels", tmp_path / "venv", tmp_path / "work"
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(wheels), str(src)], src,
        os.environ)
    # the venv sees this environment's torch and friends (a path file naming its site-packages, read after the venv's
    # own; --system-site-packages would reach the base interpreter's instead, without them when this is a venv); only
    # vlatent itself comes from the wheel
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, os.environ)
    bin_ = venv / "bin"
    own = Path(run([bin_ / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                   os.environ).strip())
    (own / "zz_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([bin_ / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", *wheels.glob("*.whl")], tmp_path,
        os.environ)
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_}{os.pathsep}{env['PATH']}", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")

    where = json.loads(run([bin_ / "python", "-c", "import json, site, vlatent, vlatent.shipped as s; print(json.dumps("
                            "[vlatent.__file__, str(s.apps_root()), site.getsitepackages()[0]]))"], work, env))
    site = Path(where[2])
    assert Path(where[0]).is_relative_to(venv) and where[1] == str(site / "vlatent" / "_apps")
    assert not {"train", "eval", "demo", "data_builders"} & {p.name for p in site.iterdir()}

    assert "methods:" in run([bin_ / "vlatent", "info"], work, env)
    assert "sft " in run([bin_ / "vlatent", "train", "--help"], work, env)
    run([bin_ / "vlatent", "build-data", "maze", "--out", "data/maze", "--n", "20", "--size", "4", "--questions",
         "first_move", "--seed", "0"], work, env)  # data/ does not exist yet: created
    run([bin_ / "vlatent", "train", "sft", "--config", "tiny/mirage_stage1", "--set", "data.train=data/maze/train.jsonl",
         "--set", "training.output_dir=runs/mirage", "--set", "training.max_steps=2",
         "--set", "training.per_device_train_batch_size=2", "--set", "training.disable_tqdm=true"], work, env)
    saved = yaml.safe_load((work / "runs" / "mirage" / "recipe.yaml").read_text())
    assert saved["training"]["max_steps"] == 2  # the shipped recipe says 400: the run saves what it ran
    assert saved["model"] == str(site / "vlatent" / "assets" / "tiny_base")
    assert saved["deepspeed"] == str(site / "vlatent" / "_apps" / "train" / "ds_configs" / "zero2.json")
    assert saved["data"]["train"] == str(work / "data" / "maze" / "train.jsonl")
    run([bin_ / "vlatent", "eval", "--model", "runs/mirage", "--bench", "maze", "--data", "data/maze",
         "--out", "runs/eval/mirage", "--max-new-tokens", "8", "--limit", "2"], work, env)
    scores = json.loads((work / "runs" / "eval" / "mirage" / "scores.json").read_text())
    assert scores["num"] == 2
