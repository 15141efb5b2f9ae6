"""SFT: recipe and data errors before any step, learning on maze records, real DeepSpeed ZeRO-3 with 2 processes,
and kill-and-resume to identical weights."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from vlatent.model import LatentVLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train.sft import load_model, seed_run  # noqa: E402
from train.sft import main as sft  # noqa: E402
from vlatent.training import load_recipe  # noqa: E402

from test_model import write_records  # noqa: E402


@pytest.fixture(scope="module")
def maze(tmp_path_factory):
    """16 maze records (first-move questions on 4x4 mazes) from the real builder."""
    out = tmp_path_factory.mktemp("maze") / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "data_builders.maze", "--out", str(out), "--n", "20", "--size", "4",
                    "--questions", "first_move", "--seed", "0"], check=True, env=env, capture_output=True)
    return out / "train.jsonl"


def recipe(tmp_path, name="r.yaml", **entries):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(entries))
    return str(path)


def tiny_recipe(tmp_path, base, train, method="mirage", **training):
    return recipe(tmp_path, model=str(base), method=method, data={"train": str(train), "max_length": 1024},
                  training={"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4,
                            "learning_rate": 3e-3, "max_steps": 30, "lr_scheduler_type": "constant",
                            "logging_steps": 5, "seed": 0, "disable_tqdm": True, **training})


def built_state(cfg, seed: int, scramble: int) -> dict[str, torch.Tensor]:
    """The weights train/sft.py starts from (seeding, then ``load_model``) with ``training.seed=seed``, the process
    RNG scrambled by ``scramble`` beforehand."""
    torch.manual_seed(scramble)
    recipe_ = load_recipe(cfg, [f"training.seed={seed}"])
    seed_run(recipe_)
    model, _ = load_model(recipe_, rank=0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_seeding(tmp_path, cfg, is_new) -> None:
    """One seed, one run: train/sft.py twice from differently scrambled process RNGs (what two invocations, or two
    jobs of one process, start from) logs the same losses and saves the same weights, the method's new modules
    (``is_new(name)``) included; another seed builds other new-module weights on the same base weights."""
    logs, weights = [], []
    for i in range(2):
        out = tmp_path / f"run{i}"
        torch.manual_seed(1000 + i)
        assert sft(["--config", cfg, "--set", f"training.output_dir={out}"]) == 0
        logs.append([{k: v for k, v in e.items() if k.startswith("loss") or k == "grad_norm"}
                     for e in json.loads((out / "log_history.json").read_text()) if "loss" in e])
        trained = LatentVLM.from_pretrained(out)
        weights.append({k: v.detach() for k, v in trained.state_dict().items()})
    assert logs[0] and logs[0] == logs[1], logs
    new = [k for k in weights[0] if is_new(k)]
    assert new, "no new-module weights"
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), \
        [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]

    first, other = built_state(cfg, 0, scramble=1), built_state(cfg, 1, scramble=1)
    differ = {k for k in first if not torch.equal(first[k], other[k])}
    assert differ and differ <= set(new), sorted(differ)


@pytest.mark.parametrize("method, stage", [("mirage", 1), ("mirage", 2), ("text", 1)])
def test_loss_goes_down_overfitting_maze_records(tmp_path, tiny_base, maze, method, stage):
    cfg = tiny_recipe(tmp_path, tiny_base, maze, method=method)
    assert sft(["--config", cfg, "--set", f"method_config={{stage: {stage}}}" if method == "mirage" else
                "method_config={}"]) == 0
    logs = [e for e in json.loads((tmp_path / "out" / "log_history.json").read_text()) if "loss" in e]
    first, last = logs[0]["loss"], logs[-1]["loss"]
    assert last < 0.6 * first, (method, stage, first, last)
    assert (tmp_path / "out" / "loss_curve.png").stat().st_size > 1000
    if method == "mirage" and stage == 1:
        assert {"loss_ce", "loss_latent_alignment"} <= set(logs[0])
    assert LatentVLM.from_pretrained(tmp_path / "out").method.config.stage == stage


def test_bad_recipes_and_data_fail_before_any_step(tmp_path, tiny_base, maze, capsys):
    def fails(cfg, match, *extra):
        assert sft(["--config", cfg, *extra]) == 2
        assert match in capsys.readouterr().err

    good = dict(model=str(tiny_base), method="mirage", data={"train": str(maze)},
                training={"output_dir": str(tmp_path / "o")})
    fails(recipe(tmp_path, **good, learning_rat=1), "unknown key(s) ['learning_rat']")
    fails(recipe(tmp_path, **{**good, "method": "dreamer"}), "unknown method 'dreamer'")
    fails(recipe(tmp_path, **{**good, "method_config": {"stag": 2}}), "unknown key(s) ['stag']")
    fails(recipe(tmp_path, **{**good, "training": {"output_dir": "x", "lr": 1}}), "unknown key(s) ['lr']")
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 3,}}')
    fails(recipe(tmp_path, **good, deepspeed=str(tmp_path / "bad.json")), "does not parse")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(maze.read_text().replace('"messages"', '"mesages"', 1))
    fails(recipe(tmp_path, **{**good, "data": {"train": str(broken)}}), "broken.jsonl line 1")
    fails(recipe(tmp_path, **{**good, "data": {"train": str(maze), "max_length": 40}}), "> max_length=40")
    assert not (tmp_path / "o" / "model.safetensors").exists()
    (tmp_path / "o").mkdir(exist_ok=True)
    (tmp_path / "o" / "keep.txt").write_text("earlier run")
    fails(recipe(tmp_path, **good), "is not empty: pass --overwrite")
    fails(recipe(tmp_path, **good), "no checkpoint-*", "--resume")
    assert (tmp_path / "o" / "keep.txt").read_text() == "earlier run"


def launch(cfg, nproc, *extra, timeout=420):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "train" / "sft.py"), "--config", cfg, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=420):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero3_two_processes_with_a_text_only_rank(tmp_path, tiny_base, stage):
    """Two ranks, two records, batch 1: every step one rank has an image + latent segment and the other a
    text-only record, so ZeRO-3 only survives if both run the same modules (dummy image, dummy targets; in
    stage 2 the same number of recurrent chunks)."""
    data = write_records(tmp_path / "data", [("img", 1, True)])
    text_only = {"id": "text-only", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Say hi."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi. The answer is A."}]}]}
    with open(data, "a") as f:
        f.write(json.dumps(text_only) + "\n")
    cfg = recipe(tmp_path, model=str(tiny_base), method="mirage", method_config={"stage": stage},
                 data={"train": str(data), "eval": str(data)},  # evaluation during training under ZeRO-3 too
                 deepspeed=str(ROOT / "train" / "ds_configs" / "zero3.json"),
                 training={"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 1, "max_steps": 3,
                           "learning_rate": 1e-3, "logging_steps": 1, "seed": 0, "disable_tqdm": True,
                           "eval_strategy": "steps", "eval_steps": 3, "per_device_eval_batch_size": 1})
    finish(launch(cfg, 2))
    evals = [e for e in json.loads((tmp_path / "out" / "log_history.json").read_text()) if "eval_loss" in e]
    assert [e["step"] for e in evals] == [3] and evals[0]["eval_loss"] > 0, evals
    model = LatentVLM.from_pretrained(tmp_path / "out")
    base = LatentVLM.from_pretrained(tiny_base, method="mirage")
    w, w0 = model.backbone.model.lm_head.weight, base.backbone.model.lm_head.weight
    assert not torch.allclose(w, w0), "training changed the weights"
    gen = model.generate([None], ["Say hi."], max_new_tokens=6, prefix="<|latent_start|>")[0]
    assert gen.latent_segments and gen.num_steps == 6


def zero3_two_processes(tmp_path, base, method, method_config, train, **entries) -> tuple[dict, dict, LatentVLM]:
    """Train ``entries`` (a recipe's freezing / LoRA keys, ``training``) with train/ds_configs/zero3.json on two
    processes; (saved backbone weights, the weights it started from, the starting model)."""
    training = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 1, "max_steps": 2,
                "lr_scheduler_type": "constant", "logging_steps": 1, "seed": 0, "disable_tqdm": True,
                **entries.pop("training")}
    cfg = recipe(tmp_path, model=str(base), method=method, method_config=method_config,
                 data={"train": str(train), "max_length": 1024},
                 deepspeed=str(ROOT / "train" / "ds_configs" / "zero3.json"), training=training, **entries)
    finish(launch(cfg, 2))
    start = LatentVLM.from_pretrained(base, method=method, **method_config)
    trained = LatentVLM.from_pretrained(tmp_path / "out").backbone.model.state_dict()
    return trained, start.backbone.model.state_dict(), start


@pytest.mark.slow
def test_zero3_two_processes_keep_sketchpad_stage1s_frozen_weights_bit_identical(tmp_path, tiny_base, rough_decoder):
    """train/recipes/sketchpad_stage1.yaml's freezing under ZeRO-3 (partitioned parameters): the vision tower, the
    merger's norm and the base vocabulary's embedding rows stay bit-identical, the merger MLP and the added tokens'
    rows (a gradient hook masks the rest) learn. With ``augment_sketches`` on and half the records text-only, a rank
    with no sketch to re-render must still run the tower as often as the other (ZeRO-3 gathers it module by module)."""
    data = write_records(tmp_path / "data", [("a", 1, True), ("b", 1, True)])
    after, before, start = zero3_two_processes(
        tmp_path, tiny_base, "sketchpad", {"stage": 1, "sketch_size": 56, "head_heads": 4, "text_only_share": 0.5,
                                           "augment_sketches": 2, "augment_decoder": str(rough_decoder)},
        data, freeze_vision_tower=True, freeze_embed_tokens=True, freeze_projector_norm=True,
        training={"learning_rate": 1e-2, "weight_decay": 0.01})  # the recipe's decay: it must spare frozen rows
    vision = [k for k in before if k.startswith("model.visual.") and ".merger." not in k]
    assert vision and all(torch.equal(after[k], before[k]) for k in vision), \
        [k for k in vision if not torch.equal(after[k], before[k])]
    norm = [k for k in before if ".merger.ln_q." in k]
    assert norm and all(torch.equal(after[k], before[k]) for k in norm)
    mlp = [k for k in before if ".merger.mlp." in k]
    assert mlp and all(not torch.equal(after[k], before[k]) for k in mlp)
    key = "model.language_model.embed_tokens.weight"
    new = [start.tokenizer.convert_tokens_to_ids(t) for t in start.method.special_tokens()]
    base_rows = torch.ones(before[key].shape[0], dtype=torch.bool)
    base_rows[new] = False
    moved = (after[key] != before[key]).any(dim=1)
    assert not moved[base_rows].any(), moved[base_rows].nonzero().flatten().tolist()
    assert moved[new].any(), "no added token's embedding row learned"
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])  # the language model trains


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_base, maze):
    def cfg(name):
        return recipe(tmp_path, f"{name}.yaml", model=str(tiny_base), method="mirage", data={"train": str(maze)},
                      deepspeed=str(ROOT / "train" / "ds_configs" / "zero2.json"),
                      training={"output_dir": str(tmp_path / name), "per_device_train_batch_size": 4,
                                "gradient_accumulation_steps": 4,  # slow enough steps to kill between saves
                                "max_steps": 8, "save_strategy": "steps", "save_steps": 4, "learning_rate": 1e-3,
                                "logging_steps": 1, "seed": 0, "disable_tqdm": True,
                                "lr_scheduler_type": "linear", "warmup_steps": 2})

    finish(launch(cfg("straight"), 1))
    killed = cfg("killed")
    proc = launch(killed, 1)
    marker = tmp_path / "killed" / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    import psutil  # the launcher starts its workers in sessions of their own: kill the whole tree

    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)
    proc.communicate()
    assert marker.exists() and not (tmp_path / "killed" / "model.safetensors").exists(), "killed too late"
    out = finish(launch(killed, 1, "--resume"))
    assert "checkpoint-4" in out or (tmp_path / "killed" / "checkpoint-8").exists()
    a = LatentVLM.from_pretrained(tmp_path / "straight").state_dict()
    b = LatentVLM.from_pretrained(tmp_path / "killed").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


def test_lora_trains_adapters_only_and_saves_a_merged_plain_checkpoint(tmp_path, tiny_base, maze):
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = tiny_recipe(tmp_path, tiny_base, maze, method="text", max_steps=20)
    assert sft(["--config", cfg, "--set", "lora={r: 8, lora_alpha: 16}"]) == 0
    logs = [e for e in json.loads((tmp_path / "out" / "log_history.json").read_text()) if "loss" in e]
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"]
    before = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_base).state_dict()
    after = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out").state_dict()  # plain HF, no peft
    assert not any("lora" in k or "base_layer" in k for k in after)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(before[q], after[q])  # the adapters were merged in
    norm = "model.language_model.layers.0.input_layernorm.weight"
    assert torch.equal(before[norm], after[norm])  # the base language model itself stayed frozen


def test_lora_keeps_learning_the_new_tokens_embeddings_only(tiny_base):
    from vlatent.training import LoraSettings, apply_lora

    model = LatentVLM.from_pretrained(tiny_base, method="mirage")
    apply_lora(model, LoraSettings(r=4))
    weight = model.backbone.model.get_input_embeddings().weight
    new = [model.tokenizer.convert_tokens_to_ids(t) for t in model.method.special_tokens()]
    weight[[0, *new]].sum().backward()
    assert weight.grad[new].abs().min() > 0 and weight.grad[0].abs().max() == 0


def test_lora_train_embeddings_trains_every_embedding_row_and_the_head(tiny_base):
    """Aurora's release under LoRA: embed_tokens and lm_head fully trainable after the resize (train.py:980-990)."""
    from vlatent.training import LoraSettings, apply_lora

    model = LatentVLM.from_pretrained(tiny_base, method="mirage")
    apply_lora(model, LoraSettings(r=4, train_embeddings=True))
    weight = model.backbone.model.get_input_embeddings().weight
    assert weight.requires_grad and model.backbone.model.get_output_embeddings().weight.requires_grad
    weight.sum().backward()
    assert (weight.grad == 1).all()  # no row masked out: every row, the base vocabulary's too, learns
    layer = model.backbone.model.model.language_model.layers[0].self_attn.q_proj
    assert not layer.base_layer.weight.requires_grad and layer.lora_A["default"].weight.requires_grad


def test_projector_learning_rate_gets_param_groups_of_its_own(tiny_base, tmp_path):
    """Aurora's release: projector at 2e-5 (mm_projector_lr), everything else (LoRA) at 2e-4 (llava_trainer.py)."""
    from transformers import TrainingArguments

    from vlatent.training import LatentTrainer, LoraSettings, apply_lora

    model = LatentVLM.from_pretrained(tiny_base, method="mirage")
    apply_lora(model, LoraSettings(r=4, train_embeddings=True))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=2e-4, weight_decay=0.1, use_cpu=True,
                             report_to=[], save_strategy="no")
    optimizer = LatentTrainer(model=model, args=args, projector_lr=2e-5).create_optimizer()
    projector = {id(p) for m in model.backbone.parts()["multi_modal_projector"] for p in m.parameters()}
    at = {lr: {id(p) for g in optimizer.param_groups if g["lr"] == lr for p in g["params"]} for lr in (2e-5, 2e-4)}
    assert at[2e-5] == projector and sum(len(g["params"]) for g in optimizer.param_groups) == len(at[2e-5] | at[2e-4])
    assert at[2e-4] == {id(p) for p in model.parameters() if p.requires_grad} - projector
    assert {g["weight_decay"] for g in optimizer.param_groups if g["lr"] == 2e-5} == {0.0, 0.1}  # decay kept
    plain = LatentTrainer(model=model, args=args).create_optimizer()  # unset: one learning rate
    assert {g["lr"] for g in plain.param_groups} == {2e-4}


def test_freezing_embed_tokens_and_the_projector_norm_as_sketchpad_stage1_releases(tiny_base):
    """Release stage 1: vision tower, merger.ln_q and embed_tokens frozen; merger.mlp, the LM and lm_head train
    (the method's added tokens keep their embedding rows learning)."""
    from vlatent.training import apply_freezing

    model = LatentVLM.from_pretrained(tiny_base, method="sketchpad", sketch_size=56, head_heads=4)
    apply_freezing(model, freeze_vision_tower=True, freeze_embed_tokens=True, freeze_projector_norm=True)
    grad = {n: p.requires_grad for n, p in model.backbone.model.named_parameters()}
    expected = {"model.visual.patch_embed.proj.weight": False, "model.visual.blocks.0.attn.qkv.weight": False,
                "model.visual.merger.ln_q.weight": False, "model.visual.merger.mlp.0.weight": True,
                "model.visual.merger.mlp.2.bias": True, "model.language_model.layers.0.self_attn.q_proj.weight": True,
                "model.language_model.norm.weight": True, "lm_head.weight": True}
    assert {n: grad[n] for n in expected} == expected
    weight = model.backbone.model.get_input_embeddings().weight  # only the added tokens' rows get a gradient
    new = [model.tokenizer.convert_tokens_to_ids(t) for t in model.method.special_tokens()]
    weight[[0, 5, *new]].sum().backward()
    assert weight.grad[new].abs().min() > 0 and weight.grad[[0, 5]].abs().max() == 0
    apply_freezing(model)  # the default trains the whole merger and every embedding row
    assert model.backbone.model.model.visual.merger.ln_q.weight.requires_grad and weight.requires_grad
    with torch.no_grad():  # a tied LM head would be frozen with embed_tokens: refused
        model.backbone.model.lm_head.weight = model.backbone.model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="ties its LM head to embed_tokens"):
        apply_freezing(model, freeze_embed_tokens=True)
    apply_freezing(model, freeze_language_model=True, freeze_embed_tokens=True)  # both frozen anyway: fine


def test_embeddings_masked_to_the_added_rows_get_no_weight_decay(tiny_base, tmp_path):
    """AdamW's decoupled decay would shrink the frozen rows a masked (zero) gradient leaves as loaded: the matrix
    goes to a no-decay group (with DeepSpeed, sft.py drops the config's one-decay optimizer for these groups)."""
    from transformers import TrainingArguments

    from vlatent.training import LatentTrainer, LoraSettings, apply_freezing, apply_lora

    model = LatentVLM.from_pretrained(tiny_base, method="mirage")
    apply_freezing(model, freeze_embed_tokens=True)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), weight_decay=0.1, use_cpu=True, report_to=[],
                             save_strategy="no")
    weight, head = model.backbone.model.get_input_embeddings().weight, model.backbone.model.lm_head.weight
    decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in LatentTrainer(model=model, args=args)
             .create_optimizer().param_groups}
    assert id(weight) in decay[0.0] and id(head) in decay[0.1]
    model = LatentVLM.from_pretrained(tiny_base, method="mirage")
    apply_lora(model, LoraSettings(r=4))  # LoRA masks the same way without train_embeddings
    decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in LatentTrainer(model=model, args=args)
             .create_optimizer().param_groups}
    assert id(model.backbone.model.get_input_embeddings().weight) in decay[0.0]


def test_lora_recipe_errors_name_the_key(tmp_path, tiny_base, maze, capsys):
    cfg = tiny_recipe(tmp_path, tiny_base, maze, method="text")
    assert sft(["--config", cfg, "--set", "lora={rank: 8}"]) == 2
    assert "lora: unknown key(s) ['rank']" in capsys.readouterr().err
    from vlatent.training import LoraSettings, apply_lora

    model = LatentVLM.from_pretrained(tiny_base, method="text")
    with pytest.raises(ValueError, match=r"\['qkv'\] name no linear layer"):
        apply_lora(model, LoraSettings(target_modules=["qkv"]))


def test_sft_learns_an_answer_only_the_image_gives(tmp_path, tiny_base):
    """The same question, answer A on reddish pictures and B on bluish ones: after 40 steps the model answers held-out
    shades right, so the vision tower -> merger -> LM path learns end to end (the learning benchmark's control)."""
    from PIL import Image

    def colour(i, red):
        shade = (200 + 5 * i, 20 + 3 * i, 40) if red else (40, 20 + 3 * i, 200 + 5 * i)
        return Image.new("RGB", (56, 56), shade)

    records = []
    for i in range(16):
        path = tmp_path / f"{i}.png"
        colour(i % 8, red=i % 2 == 0).save(path)
        answer = "A" if i % 2 == 0 else "B"
        records.append({"id": f"c{i}", "images": [str(path)], "answer": answer, "messages": [
            {"role": "user", "content": [{"type": "image", "image": 0}, {"type": "text", "text": "A or B?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"The answer is {answer}."}]}]})
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert sft(["--config", tiny_recipe(tmp_path, tiny_base, train, method="text", max_steps=40)]) == 0
    model = LatentVLM.from_pretrained(tmp_path / "out").eval()
    held_out = [colour(i, red) for i in (8, 9) for red in (True, False)]  # shades never trained on
    gens = model.generate(held_out, ["A or B?"] * 4, max_new_tokens=6)
    assert [g.text for g in gens] == ["The answer is A.", "The answer is B."] * 2
