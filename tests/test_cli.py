"""The `vlatent` command, the tiny-model builder, and the README <-> CI contract."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlatent.cli import main
from vlatent.methods import list_methods
from vlatent.testing import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_info_lists_methods_and_backbones(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"methods:   {', '.join(list_methods())}" in out and "transformers" in out
    assert "backbones: gemma3, llava_onevision, qwen2_5_vl, qwen3_vl" in out


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "vlatent.cli", "info"], capture_output=True, text=True, check=True)
    assert "qwen2_5_vl" in out.stdout


@pytest.mark.slow
def test_quickstart_builds_trains_evaluates_and_reports(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path), "--n", "30", "--max-steps", "2", "--max-new-tokens", "12"]) == 0
    assert f"report: {tmp_path / 'report.md'}" in capsys.readouterr().out
    report = (tmp_path / "report.md").read_text()
    assert "| mirage_stage2 |" in report and "| text_sft |" in report
    for name in ("mirage_stage1", "mirage_stage2", "text_sft"):
        assert (tmp_path / name / "loss_curve.png").is_file() and (tmp_path / name / "model.safetensors").is_file()
    scores = json.loads((tmp_path / "eval" / "mirage_stage2" / "scores.json").read_text())
    assert scores["num"] == len((tmp_path / "data" / "test.jsonl").read_text().splitlines())


def test_build_tiny_model_wraps_and_caches(tmp_path):
    path = build_tiny_model(tmp_path / "m", method="mirage", num_latent_tokens=2, hidden_size=32)
    saved = json.loads((path / "vlatent_config.json").read_text())
    assert saved["method"] == "mirage" and saved["method_config"]["num_latent_tokens"] == 2
    assert json.loads((path / "config.json").read_text())["text_config"]["hidden_size"] == 32
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(tmp_path / "m", method="mirage", num_latent_tokens=2, hidden_size=32) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert len(commands) == 2, "the README keeps exactly two set-up commands"
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "vlatent quickstart" in commands[0]


def test_train_help_lists_each_entry_point_on_one_line(capsys):
    assert main(["train", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in ("sft", "vlpo"):
        assert len([line for line in lines if line.split()[:1] == [name]]) == 1, lines
