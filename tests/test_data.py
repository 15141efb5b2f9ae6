"""Record validation, chat rendering and the interleaved collator, on tiny records written into tmp folders."""

import copy
import json
import re

import datasets
import pytest
import torch
from transformers import AutoProcessor

from vlatent.data import INLINE_IMAGE, InterleavedCollator, RecordError, load_records, render_chat, render_prompt
from vlatent.methods.base import LatentTokens
from vlatent.testing import tiny_image

LT = LatentTokens()


def make_record(rid="maze-000017"):
    return {
        "id": rid,
        "images": ["images/q.png", "images/sketch.png"],
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": 0}, {"type": "text", "text": "Which way?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Let me sketch the route."},
                                              {"type": "latent", "image": 1},
                                              {"type": "text", "text": "The answer is B."}]},
        ],
        "answer": "B", "task": "maze", "meta": {},
    }  # fmt: skip


def write_dataset(folder, records, name="train.jsonl"):
    """Records as jsonl next to images/q.png (56x56) and images/sketch.png (84x56, so its grid differs)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    tiny_image(0, (56, 56)).save(folder / "images" / "q.png")
    tiny_image(1, (84, 56)).save(folder / "images" / "sketch.png")
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def processor(tiny_base):
    """The tiny base's processor (shared session fixture of conftest) with the latent tokens added."""
    proc = AutoProcessor.from_pretrained(tiny_base)
    proc.tokenizer.add_special_tokens({"extra_special_tokens": [LT.start, LT.pad, LT.end]},
                                      replace_extra_special_tokens=False)
    return proc


@pytest.fixture
def records(tmp_path):
    return load_records(write_dataset(tmp_path, [make_record()]))


def pieces(processor, text):
    return [processor.tokenizer.decode([i]) for i in processor.tokenizer(text, add_special_tokens=False)["input_ids"]]


def supervised(processor, batch, row=0):
    ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
    assert all(lab in (-100, i) for i, lab in zip(ids, labels))  # unshifted: a label is its own token or ignored
    return [processor.tokenizer.decode([i]) for i, lab in zip(ids, labels) if lab != -100]


# -- validation ---------------------------------------------------------------------------------------


def test_valid_file_loads_with_absolute_paths(tmp_path):
    rec = make_record()
    rec["messages"][1]["content"][0]["observation"] = True
    (recs,) = load_records(write_dataset(tmp_path, [rec]))
    assert recs["id"] == "maze-000017" and recs["answer"] == "B"
    assert recs["images"] == [str((tmp_path / "images" / n).resolve()) for n in ("q.png", "sketch.png")]
    assert recs["messages"][1]["content"][0]["observation"] is True


def test_folder_needs_a_split(tmp_path):
    write_dataset(tmp_path, [make_record()], name="val.jsonl")
    assert load_records(tmp_path, split="val")[0]["id"] == "maze-000017"
    with pytest.raises(ValueError, match="split="):
        load_records(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path, split="train")


def test_unreferenced_image_is_fine(tmp_path):
    rec = make_record()
    rec["messages"][1]["content"].pop(1)
    assert load_records(write_dataset(tmp_path, [rec]))[0]["images"][1].endswith("sketch.png")


def test_error_names_record_file_line_and_field(tmp_path):
    bad = make_record("maze-000003")
    bad["messages"][1]["content"][1]["image"] = 5
    path = write_dataset(tmp_path, [make_record("a"), make_record("b"), bad])
    with pytest.raises(RecordError) as e:
        load_records(path)
    assert str(e.value) == (f"record 'maze-000003' ({path} line 3): messages[1].content[1].image: "
                            "index 5 out of range for 2 images")


def _set(path, value):
    """An edit that sets a field by dotted path: ``_set("messages.0.role", "tool")``."""

    def edit(rec):
        *keys, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for k in keys:
            rec = rec[k]
        rec[last] = value

    return edit


def _insert_system_latent(rec):
    rec["messages"].insert(0, {"role": "system", "content": [{"type": "latent", "image": 1}]})


# name: (edit, field at fault, regex of the problem)
BAD_RECORDS = {
    "images not a list": (_set("images", "images/q.png"), "images", "expected a list of path strings"),
    "image path not a string": (_set("images.1", 7), "images", "expected a list of path strings"),
    "missing image file": (_set("images.1", "images/nope.png"), "images[1]", ".*nope.png' does not exist"),
    "index out of range": (_set("messages.0.content.0.image", 2), "messages[0].content[0].image",
                           "index 2 out of range for 2 images"),
    "negative index": (_set("messages.0.content.0.image", -1), "messages[0].content[0].image", "index -1 out of range"),
    "index not an int": (_set("messages.0.content.0.image", "0"), "messages[0].content[0].image", "expected an int"),
    "index is a bool": (_set("messages.1.content.1.image", True), "messages[1].content[1].image", "expected an int"),
    "latent in user turn": (_set("messages.0.content.0.type", "latent"), "messages[0].content[0]",
                            "latent segment in a user turn"),
    "latent in system turn": (_insert_system_latent, "messages[0].content[0]", "latent segment in a system turn"),
    "empty assistant turn": (_set("messages.1.content", []), "messages[1].content", "empty assistant turn"),
    "blank assistant text": (_set("messages.1.content", [{"type": "text", "text": " \n"}]), "messages[1].content",
                             "empty assistant turn"),
    "unknown content type": (_set("messages.0.content.1.type", "video"), "messages[0].content[1].type",
                             "unknown content type 'video'"),
    "unknown role": (_set("messages.0.role", "tool"), "messages[0].role", "unknown role 'tool'"),
    "content not a list": (_set("messages.0.content", "hi"), "messages[0].content", "expected a list"),
    "messages empty": (_set("messages", []), "messages", "expected a non-empty list"),
    "messages missing": (lambda r: r.pop("messages"), "messages", "expected a non-empty list"),
    "no assistant turn": (lambda r: r["messages"].pop(1), "messages", "no assistant turn"),
    "text not a string": (_set("messages.0.content.1.text", 3), "messages[0].content[1].text", "expected a string"),
    "text missing": (lambda r: r["messages"][0]["content"][1].pop("text"), "messages[0].content[1].text",
                     "expected a string"),
    "observation not a bool": (_set("messages.1.content.0.observation", "yes"), "messages[1].content[0].observation",
                               "expected true or false"),
}


@pytest.mark.parametrize("edit,field,problem", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_bad_record_is_named(tmp_path, edit, field, problem):
    bad = make_record("maze-000042")
    edit(bad)
    path = write_dataset(tmp_path, [make_record("ok-1"), bad])
    where = re.escape(f"record 'maze-000042' ({path} line 2): {field}: ")
    with pytest.raises(RecordError, match=f"^{where}{problem}"):
        load_records(path)


@pytest.mark.parametrize("rid,message", [(None, "id: missing"), (42, "id: expected a non-empty string, got 42"),
                                         ("", "id: expected a non-empty string")])
def test_bad_id_names_the_line(tmp_path, rid, message):
    bad = make_record()
    bad["id"] = rid
    path = write_dataset(tmp_path, [make_record("ok-1"), bad])
    with pytest.raises(RecordError, match=rf"^record at {re.escape(str(path))} line 2: {message}"):
        load_records(path)


def test_invalid_json_names_the_line(tmp_path):
    path = write_dataset(tmp_path, [make_record("ok-1")])
    path.write_text(path.read_text() + "\n" + '{"id": "x", "images": [}\n')
    with pytest.raises(RecordError, match=rf"^record at {re.escape(str(path))} line 3: line: invalid JSON"):
        load_records(path)


def test_duplicate_id(tmp_path):
    path = write_dataset(tmp_path, [make_record("dup"), make_record("other"), make_record("dup")])
    where = re.escape(f"record 'dup' ({path} line 3): id: duplicate id, first used at {path} line 1")
    with pytest.raises(RecordError, match=where):
        load_records(path)


def test_corrupt_image(tmp_path):
    path = write_dataset(tmp_path, [make_record()])
    (tmp_path / "images" / "sketch.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(RecordError, match=r"record 'maze-000017' .*images\[1\]: .* is not a readable image"):
        load_records(path)


def test_hf_dataset_input(tmp_path):
    write_dataset(tmp_path, [])
    rec = make_record()
    rec["messages"][1]["content"][0]["observation"] = True
    ds = datasets.Dataset.from_list([rec])  # Arrow fills every content item's missing fields with None
    (loaded,) = load_records(ds, root=tmp_path)
    assert loaded["images"][0] == str((tmp_path / "images" / "q.png").resolve())
    assert loaded["messages"] == make_record()["messages"][:1] + [rec["messages"][1]]
    with pytest.raises(RecordError, match=r"record 'maze-000017' \(row 0\): images\[0\]: relative path .* root="):
        load_records(ds)
    absolute = datasets.Dataset.from_list([{**rec, "images": loaded["images"]}])
    assert load_records(absolute)[0]["images"] == loaded["images"]


# -- chat rendering ------------------------------------------------------------------------------------


def test_render_chat_converts_latents_before_templating(processor, records):
    msgs = records[0]["messages"]
    text, order = render_chat(processor, msgs, latent_text=lambda j: LT.segment(2))
    assert order == [0]
    assert text.endswith("<|im_start|>assistant\nLet me sketch the route.<|latent_start|><|latent_pad|><|latent_pad|>"
                         "<|latent_end|>The answer is B.<|im_end|>\n")
    text, order = render_chat(processor, msgs, latent_text=lambda j: INLINE_IMAGE)
    assert order == [0, 1] and text.count("<|image_pad|>") == 2
    text, order = render_chat(processor, msgs, latent_text=lambda j: "")
    assert order == [0] and "route.The answer" in text


def test_render_prompt(processor):
    text = render_prompt(processor, "Which way?", 2, prefix="Let me")
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert text.endswith("<|vision_end|>Which way?<|im_end|>\n<|im_start|>assistant\nLet me")


# -- collator ------------------------------------------------------------------------------------------


def test_labels_supervise_assistant_content_only(processor, records):
    batch = InterleavedCollator(processor, latent_tokens=LT, num_latent_tokens=2)(records)
    expected = (pieces(processor, "Let me sketch the route.") + ["<|latent_start|>", "<|latent_end|>"]
                + pieces(processor, "The answer is B.") + ["<|im_end|>"])
    assert supervised(processor, batch) == expected
    assert "".join(expected) == "Let me sketch the route.<|latent_start|><|latent_end|>The answer is B.<|im_end|>"
    ids = batch["input_ids"][0].tolist()
    first = next(t for t, lab in enumerate(batch["labels"][0].tolist()) if lab != -100)
    assert processor.tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    assert processor.tokenizer.decode(ids[first:]).startswith("Let me")


def test_labels_over_several_assistant_turns(processor, tmp_path):
    rec = make_record()
    rec["messages"] = ([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}] + rec["messages"]
                       + [{"role": "user", "content": [{"type": "text", "text": "Why?"}]},
                          {"role": "assistant", "content": [{"type": "image", "image": 1},
                                                            {"type": "text", "text": "See the path."}]}])
    batch = InterleavedCollator(processor, latent_tokens=LT, num_latent_tokens=3)(
        load_records(write_dataset(tmp_path, [rec])))
    assert "".join(supervised(processor, batch)) == (
        "Let me sketch the route.<|latent_start|><|latent_end|>The answer is B.<|im_end|>See the path.<|im_end|>")


def test_latent_mode_batch(processor, tmp_path):
    two = make_record("two")
    two["messages"][1]["content"].append({"type": "latent", "image": 0})
    recs = load_records(write_dataset(tmp_path, [two, make_record("one")]))
    k = 3
    batch = InterleavedCollator(processor, latent_tokens=LT, num_latent_tokens=k)(recs)
    pad = processor.tokenizer.convert_tokens_to_ids(LT.pad)
    image_pad = processor.image_token_id
    assert batch["ids"] == ["two", "one"]
    assert batch["num_latent_segments"].tolist() == [2, 1]
    assert (batch["input_ids"] == pad).sum(1).tolist() == [2 * k, k]
    # helper images of the segments in order of appearance, row-major: sketch, q (for "two"), then sketch
    assert batch["latent_target_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 4], [1, 4, 6]]
    assert batch["latent_target_pixel_values"].shape[0] == batch["latent_target_grid_thw"].prod(-1).sum()
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    assert batch["pixel_values"].shape[0] == batch["image_grid_thw"].prod(-1).sum()
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == image_pad).long())
    n = batch["attention_mask"].sum(1)
    assert n[0] > n[1] and batch["input_ids"].shape == batch["labels"].shape == (2, n[0])
    assert (batch["input_ids"][1, n[1]:] == processor.tokenizer.pad_token_id).all()
    assert (batch["labels"][1, n[1]:] == -100).all()
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "num_latent_segments"):
        assert batch[key].dtype == torch.long, key


def test_left_padding(processor, tmp_path):
    two = make_record("two")
    two["messages"][1]["content"].append({"type": "latent", "image": 0})
    recs = load_records(write_dataset(tmp_path, [two, make_record("one")]))
    right = InterleavedCollator(processor, latent_tokens=LT, num_latent_tokens=2)(recs)
    left = InterleavedCollator(processor, latent_tokens=LT, num_latent_tokens=2, padding_side="left")(recs)
    shift = int(right["attention_mask"][0].sum() - right["attention_mask"][1].sum())
    assert left["attention_mask"][1, :shift].sum() == 0
    for key in ("input_ids", "labels", "mm_token_type_ids"):
        assert torch.equal(left[key][1, shift:], right[key][1, :-shift]), key


def test_image_mode_puts_helper_image_inline(processor, records):
    batch = InterleavedCollator(processor, latent_tokens=None, latent_mode="image")(records)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6]]
    assert (batch["input_ids"] == processor.image_token_id).sum() == (4 * 4 + 4 * 6) // 4
    assert batch["pixel_values"].shape[0] == 4 * 4 + 4 * 6
    assert batch["num_latent_segments"].tolist() == [0]
    assert "latent_target_pixel_values" not in batch and "latent_target_grid_thw" not in batch
    assert supervised(processor, batch) == (pieces(processor, "Let me sketch the route.")
                                            + pieces(processor, "The answer is B.") + ["<|im_end|>"])


def test_drop_mode(processor, records):
    batch = InterleavedCollator(processor, latent_tokens=LT, latent_mode="drop")(records)
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert "latent" not in text and "route.The answer is B." in text
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert "latent_target_grid_thw" not in batch and batch["num_latent_segments"].tolist() == [0]


def test_text_only_record_has_no_pixels(processor, tmp_path):
    rec = make_record()
    rec["messages"][0]["content"].pop(0)
    rec["messages"][1]["content"].pop(1)
    batch = InterleavedCollator(processor, latent_tokens=LT)(load_records(write_dataset(tmp_path, [rec])))
    assert "pixel_values" not in batch and "image_grid_thw" not in batch and "latent_target_grid_thw" not in batch
    assert batch["mm_token_type_ids"].sum() == 0


def test_max_length_error_and_skip(processor, tmp_path):
    long = make_record("long")
    long["messages"][1]["content"][0]["text"] = "Let me sketch the route. " * 20
    recs = load_records(write_dataset(tmp_path, [make_record("short"), long]))
    full = InterleavedCollator(processor, latent_tokens=LT)(recs)
    n_short, n_long = full["attention_mask"].sum(1).tolist()
    assert [InterleavedCollator(processor, latent_tokens=LT).length(r) for r in recs] == [n_short, n_long]
    limit = n_short + 1
    with pytest.raises(RecordError, match=rf"record 'long': length: {n_long} tokens > max_length={limit}"):
        InterleavedCollator(processor, latent_tokens=LT, max_length=limit)(recs)
    collate = InterleavedCollator(processor, latent_tokens=LT, max_length=limit, on_overflow="skip")
    batch = collate(recs)
    assert batch["ids"] == ["short"] and batch["input_ids"].shape == (1, n_short)
    assert batch["num_latent_segments"].tolist() == [1] and batch["latent_target_grid_thw"].shape == (1, 3)
    with pytest.raises(RecordError, match="all 1 records of the batch are longer than max_length"):
        collate(recs[1:])
    assert collate.num_skipped == 2 and collate.skipped_ids == ["long", "long"]
    assert InterleavedCollator(processor, latent_tokens=LT, max_length=n_long)(recs)["input_ids"].shape == (2, n_long)


def test_min_max_pixels_bound_image_tokens(processor, tmp_path):
    rec = make_record()
    recs = load_records(write_dataset(tmp_path, [rec]))
    tiny_image(2, (224, 224)).save(tmp_path / "images" / "q.png")  # default max_pixels=112*112 -> 8x8 patches
    tiny_image(3, (28, 28)).save(tmp_path / "images" / "sketch.png")  # default min_pixels=56*56 -> 4x4 patches

    def grids(**kwargs):
        batch = InterleavedCollator(processor, latent_tokens=LT, **kwargs)(recs)
        return batch["image_grid_thw"].tolist(), batch["latent_target_grid_thw"].tolist()

    assert grids() == ([[1, 8, 8]], [[1, 4, 4]])
    assert grids(max_pixels=56 * 56) == ([[1, 4, 4]], [[1, 4, 4]])
    assert grids(min_pixels=112 * 112, max_pixels=112 * 112) == ([[1, 8, 8]], [[1, 8, 8]])
    batch = InterleavedCollator(processor, latent_tokens=LT, max_pixels=56 * 56)(recs)
    assert (batch["input_ids"] == processor.image_token_id).sum() == 4


def test_image_token_budget_shrinks_a_records_images_together(processor, tmp_path):
    recs = load_records(write_dataset(tmp_path, [make_record()]))
    tiny_image(2, (224, 168)).save(tmp_path / "images" / "q.png")  # 8 x 6 tokens of 28 px (patch 14, merge 2)
    tiny_image(3, (112, 112)).save(tmp_path / "images" / "sketch.png")  # 4 x 4: 48 + 16 = 64 image tokens

    def collate(budget):
        collator = InterleavedCollator(processor, latent_tokens=LT, max_pixels=224 * 224, image_token_budget=budget)
        batch = collator(recs)
        return collator, batch["image_grid_thw"].tolist() + batch["latent_target_grid_thw"].tolist()

    collator, grids = collate(64)  # within the budget: untouched
    assert grids == [[1, 12, 16], [1, 8, 8]] and collator.shrunk_ids == set() and collator.budget_sizes(recs[0]) is None
    # 32: sides x sqrt(32 / 64), floored to 28 px: 224x168 -> 158x118 -> 140x112 (5 x 4), 112 -> 79 -> 56 (2 x 2)
    collator, grids = collate(32)
    assert grids == [[1, 8, 10], [1, 4, 4]] and 5 * 4 + 2 * 2 <= 32
    assert collator.budget_sizes(recs[0]) == {0: (140, 112), 1: (56, 56)} and collator.shrunk_ids == {"maze-000017"}
    # 8: 224x168 -> 79x59 -> 56x56 (2 x 2); 112 -> 39 -> 28, under min_pixels = 56 * 56: back up to 56 (2 x 2)
    assert collate(8)[1] == [[1, 4, 4], [1, 4, 4]]
    with pytest.raises(ValueError, match="image_token_budget"):
        InterleavedCollator(processor, latent_tokens=LT, image_token_budget=0)


def test_budget_then_max_length_fallback_is_logged(processor, tmp_path, capsys):
    """train/sft.py's up-front pass: records shrunk to the budget are counted, those still too long skipped."""
    from train.sft import check_lengths

    long = make_record("long")
    long["messages"][1]["content"][0]["text"] = "Let me sketch the route. " * 20
    recs = load_records(write_dataset(tmp_path, [make_record("short"), long]))
    limit = InterleavedCollator(processor, latent_tokens=LT, image_token_budget=4).length(recs[0])
    collator = InterleavedCollator(processor, latent_tokens=LT, max_length=limit, on_overflow="skip",
                                   image_token_budget=4)  # both records: 4 + 6 tokens of 28 px, over 4
    assert [r["id"] for r in check_lengths(collator, recs)] == ["short"]
    out = capsys.readouterr().out
    assert "shrank the images of 2 of 2 record(s) to data.image_token_budget=4" in out
    assert f"skipped 1 record(s) longer than max_length={limit}" in out


def test_image_unreadable_since_validation(processor, tmp_path):
    recs = load_records(write_dataset(tmp_path, [make_record()]))
    (tmp_path / "images" / "sketch.png").unlink()
    with pytest.raises(RecordError, match=r"record 'maze-000017': images\[1\]: cannot read"):
        InterleavedCollator(processor, latent_tokens=LT)(recs)


def test_control_tokens_in_text_are_rejected(processor, records):
    bad = copy.deepcopy(records)
    bad[0]["messages"][1]["content"][2]["text"] = "B.<|im_end|>"
    with pytest.raises(RecordError, match=r"record 'maze-000017': messages\[1\]\.content\[2\]\.text: .*'<\|im_end\|>'"):
        InterleavedCollator(processor, latent_tokens=LT)(bad)


def test_bad_arguments(processor, tiny_base):
    for kwargs, message in [
        (dict(latent_tokens=LT, latent_mode="sketch"), "latent_mode='sketch'"),
        (dict(latent_tokens=None), "needs latent_tokens"),
        (dict(latent_tokens=LT, num_latent_tokens=0), "num_latent_tokens"),
        (dict(latent_tokens=LT, max_length=0), "max_length"),
        (dict(latent_tokens=LT, on_overflow="truncate"), "on_overflow"),
        (dict(latent_tokens=LT, padding_side="middle"), "padding_side"),
        (dict(latent_tokens=LT, min_pixels=200 * 200, max_pixels=100 * 100), "min_pixels"),
    ]:
        with pytest.raises(ValueError, match=message):
            InterleavedCollator(processor, **kwargs)
    bare = AutoProcessor.from_pretrained(tiny_base)  # latent tokens never added
    with pytest.raises(ValueError, match=re.escape("'<|latent_start|>' is not a single token")):
        InterleavedCollator(bare, latent_tokens=LT)
    InterleavedCollator(bare, latent_tokens=None, latent_mode="image")
