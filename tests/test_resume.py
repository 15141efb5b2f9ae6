"""--resume that can only pass if the checkpoint is loaded, for SFT and VLPO: a run is cut after its first checkpoint
(the later checkpoints and the final model deleted, as a kill leaves it), resumed, and must log only the steps after
the checkpoint, each equal to the uninterrupted run's; resumed from a checkpoint whose weights were altered, its first
step must differ (a restart from the base model, which a same-seed run makes identical, would not)."""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlatent.model import LatentVLM
from vlatent.training.trainer import MANIFEST, file_hashes

from test_sketchpad import TINY
from test_training import maze, recipe  # noqa: F401  (16 maze records from the real builder)
from test_vlpo import write_prompts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train.sft import main as sft  # noqa: E402
from train.vlpo import main as vlpo  # noqa: E402

TRAINING = {"per_device_train_batch_size": 2, "max_steps": 6, "save_strategy": "steps", "save_steps": 3,
            "logging_steps": 1, "learning_rate": 1e-3, "lr_scheduler_type": "linear", "seed": 0, "disable_tqdm": True}


def logged(out: Path, key: str) -> dict[int, float]:
    """Step -> ``key`` of every logged training step."""
    return {e["step"]: e[key] for e in json.loads((out / "log_history.json").read_text()) if key in e}


def cut_after_first_checkpoint(out: Path) -> None:
    """What a kill between the first and second checkpoint leaves: checkpoint-3 only."""
    for path in out.iterdir():
        if path.name != "checkpoint-3":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def alter_weights(checkpoint: Path) -> None:
    """Scale the checkpoint's LM head and re-sign the manifest, so the checkpoint is valid but not the run's."""
    path = checkpoint / "model.safetensors"
    weights = load_file(path)
    name = next(k for k in weights if k.endswith("lm_head.weight"))
    weights[name] = weights[name] * 1.5
    save_file(weights, path, metadata={"format": "pt"})
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"] = file_hashes(checkpoint)
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def printed_steps(text: str) -> int:
    """How many training steps this invocation logged (the Trainer prints one dict with 'loss' per step)."""
    return sum(line.startswith("{") and "'loss'" in line for line in text.splitlines())


def check_resume(run, out: Path, capsys, key: str) -> None:
    """``key``: a logged number that depends on the weights (VLPO's on-policy loss is about 0 at every step)."""
    assert run() == 0
    straight, weights = logged(out, key), LatentVLM.from_pretrained(out).state_dict()
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    cut_after_first_checkpoint(out)
    capsys.readouterr()
    assert run("--resume") == 0
    assert printed_steps(capsys.readouterr().out) == 3  # steps 4-6 only: the first three came from the checkpoint
    resumed = logged(out, key)
    assert resumed.keys() == straight.keys()
    for step in straight:  # same weights, optimizer, scheduler and data position as the uninterrupted run
        assert abs(resumed[step] - straight[step]) <= 1e-4 * abs(straight[step]), (step, resumed, straight)
    for k, v in LatentVLM.from_pretrained(out).state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-5, rtol=1e-4, msg=k)

    cut_after_first_checkpoint(out)
    alter_weights(out / "checkpoint-3")
    assert run("--resume") == 0
    altered = logged(out, key)
    assert abs(altered[4] - straight[4]) > 1e-3, (altered, straight)  # step 4 ran on the checkpoint's weights
    assert all(altered[s] == straight[s] for s in (1, 2, 3))


def test_sft_resume_continues_from_the_checkpoint(tmp_path, tiny_base, maze, capsys):  # noqa: F811
    out = tmp_path / "run"
    cfg = recipe(tmp_path, model=str(tiny_base), method="mirage", data={"train": str(maze), "max_length": 1024},
                 training={"output_dir": str(out), **TRAINING})
    check_resume(lambda *extra: sft(["--config", cfg, *extra]), out, capsys, "loss")


def test_sketchpad_resume_redraws_the_uninterrupted_runs_rerenderings(tmp_path, tiny_base, maze,  # noqa: F811
                                                                      rough_decoder, capsys):
    """``augment_sketches``: how often each fed sketch is re-rendered is drawn from the method's own generator, so the
    steps after a resume match the uninterrupted run only if the checkpoint restores its state (restarted from its
    seed, step 4 would re-render as step 1 did)."""
    out = tmp_path / "run"
    cfg = recipe(tmp_path, model=str(tiny_base), method="sketchpad",
                 method_config={"stage": 1, "augment_sketches": 2, "augment_decoder": str(rough_decoder), **TINY},
                 data={"train": str(maze), "max_length": 1024}, training={"output_dir": str(out), **TRAINING})
    check_resume(lambda *extra: sft(["--config", cfg, *extra]), out, capsys, "loss")
    assert (out / "checkpoint-3" / "vlatent_rng_0.pt").is_file()


def test_vlpo_resume_continues_from_the_checkpoint(tmp_path, tiny_base, capsys):
    out = tmp_path / "run"
    data = write_prompts(tmp_path / "data", 8)
    cfg = recipe(tmp_path, model=str(tiny_base), method="mirage", data={"train": str(data)},
                 vlpo={"num_generations": 2, "max_completion_length": 6, "prefix": "<|latent_start|>",
                       "latent_sigma": 0.5, "reward_funcs": ["format"], "temperature": 1.0},
                 training={"output_dir": str(out), **TRAINING})
    check_resume(lambda *extra: vlpo(["--config", cfg, *extra]), out, capsys, "text_log_prob")


def test_vlpo_resume_samples_what_the_uninterrupted_run_samples(tmp_path, tiny_base, capsys):
    """One rollout batch per step and a reward that varies (the completions' length), so every step samples anew and
    the policy moves: resumed at checkpoint-3, steps 4-6 must sample what the uninterrupted run sampled. That needs the
    rollout generator's state from the checkpoint; restarted from its seed, step 4 would redraw step 1's samples."""
    import test_vlpo  # noqa: F401  (registers the "test_length" reward)

    out = tmp_path / "run"
    data = write_prompts(tmp_path / "data", 8)
    cfg = recipe(tmp_path, model=str(tiny_base), method="mirage", data={"train": str(data)},
                 vlpo={"num_generations": 2, "max_completion_length": 8, "latent_sigma": 0.5, "temperature": 1.0,
                       "updates_per_rollout": 1, "reward_funcs": ["test_length"]},
                 training={"output_dir": str(out), **TRAINING})
    assert vlpo(["--config", cfg]) == 0
    assert (out / "checkpoint-3" / "vlatent_rng_0.pt").is_file()
    straight = {key: logged(out, key) for key in ("reward", "text_log_prob", "grad_norm")}
    assert len(set(straight["reward"].values())) > 1 and max(straight["grad_norm"].values()) > 0  # it samples, learns
    cut_after_first_checkpoint(out)
    assert vlpo(["--config", cfg, "--resume"]) == 0
    for key, values in straight.items():
        resumed = logged(out, key)
        for step in (4, 5, 6):
            assert abs(resumed[step] - values[step]) <= 1e-4 * abs(values[step]) + 1e-6, (key, step, resumed, values)
