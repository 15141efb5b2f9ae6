"""``vlatent eval``: evaluate a ``LatentVLM`` on MMMU, MMStar or a synthetic task; batched, resumable, shardable.

    vlatent eval --model ckpt/ --bench mmmu --out runs/mmmu                  # MMMU/MMMU from the hub, validation split
    vlatent eval --model ckpt/ --bench mmstar --data ~/LMUData/MMStar.tsv --out runs/mmstar --prompt vlmevalkit
    vlatent eval --model ckpt/ --bench mmmu,mmstar --data ~/MMMU --data ~/MMStar/mmstar.parquet --out runs/both
    vlatent eval --model ckpt/ --bench maze --data data/maze --out runs/maze --latent on
    torchrun --nproc_per_node 8 -m vlatent.cli eval --model ckpt/ --bench mmmu --data ~/MMMU --out runs/mmmu

Each batch's prediction rows are appended to ``OUT/predictions.jsonl`` and flushed as soon as they are made; rerunning
the same command skips the ids already predicted there and retries those whose row is an error (``OUT/run.json`` keeps
the settings, and a rerun with other settings is refused rather than mixed in). A run in which every example it tried
failed (a systemic fault: a broken model, images in a format nothing decodes) scores nothing and is an error naming the
first failure. Under ``torchrun`` (``RANK`` / ``WORLD_SIZE``) rank r takes examples r::N into
``predictions.rank{r}.jsonl``, and rank 0, once every example has a row, merges them into ``predictions.jsonl``. Rank 0
then scores the run from ``predictions.jsonl`` alone (``scores.json``) and writes ``report.md`` and ``scores.png``;
on MMMU's test split, whose answers are withheld, also ``submission.json`` for the MMMU evaluation server. Several
benchmarks in one command (``--bench mmmu,mmstar``) run one after the other, each into ``OUT/NAME``, and
``OUT/summary.md`` tables them.

``--images off`` withholds every image (the prompt keeps its text): MMStar's multi-modal gain ``MG = S_v - S_wv`` and
leakage ``ML = max(0, S_wv - S_t)`` come from such runs, given to the with-images run as ``--gain-against DIR`` (this
model, images withheld) and ``--leakage-against DIR`` (its LLM base, text only); they land in ``scores.json`` and the
report.

``--latent`` says who decides where the latent segments go (``LATENT_MODES``; ``run.json`` records the mode):

- ``auto`` (the default, for every method): no prefix; the model opens a latent segment when it chooses to, as the
  papers' inference does and as every training set is written (text first, then a latent segment).
- ``on``: every answer starts with the method's latent start token, so the model thinks visually (its K latent steps)
  before it writes anything. Methods with latent tokens only.
- ``off``: no latents at all: the latent start token is never sampled (``generate(..., allow_latents=False)``), so
  the model answers in text only, even where it would have opened a segment. For a method without latent tokens
  (text, perception, whose segments are ordinary text tokens) ``off`` is ``auto``: there is nothing to suppress.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from vlatent.generation import Generation, TextSegment
from vlatent.model import LatentVLM
from vlatent.scoring import mmstar_gain_leakage

from .benchmarks import (BENCHMARKS, PROMPTS, Benchmark, EvalError, Example, ImageError, get_benchmark, judge,
                         load_examples, mmmu_submission, score)
from .report import write_report, write_summary

PREDICTIONS = "predictions.jsonl"
SUBMISSION = "submission.json"  # MMMU test split: id -> answer, for the MMMU evaluation server
LATENT_MODES = ("auto", "on", "off")  # see the module docstring
POLL_SECONDS = 2.0  # how often rank 0 looks for the other ranks' rows


def evaluate(model: LatentVLM, bench: str, data: str | os.PathLike | None, out: str | os.PathLike, *,
             split: str | None = None, batch_size: int = 8, max_new_tokens: int = 256, latent: str = "auto",
             limit: int | None = None, prompt: str = "official", images: str = "on",
             gain_against: str | os.PathLike | None = None, leakage_against: str | os.PathLike | None = None,
             rank: int | None = None, world_size: int | None = None, progress: bool = True,
             allow_outside: Iterable[str | os.PathLike] = (), examples: list[Example] | None = None) -> dict:
    """Evaluate an already loaded ``model`` on ``bench`` into the folder ``out`` (see the module docstring).

    ``data``: hub id or folder (None: the benchmark's hub id; the synthetic tasks need a ``data_builders`` folder).
    ``latent``: ``"auto"`` (the model decides), ``"on"`` (start in latent mode) or ``"off"`` (no latents): see the
    module docstring. ``limit``: the first N examples only. ``images="off"`` withholds the images; ``gain_against`` /
    ``leakage_against`` (MMStar) are output folders of such runs, for the multi-modal gain and leakage. ``rank`` /
    ``world_size`` default to the ``RANK`` / ``WORLD_SIZE`` that torchrun sets. ``allow_outside``: folders besides
    the data's own that its image paths may lead into; ``examples``: ``load_examples`` of ``data``, already read and
    checked (``main`` reads them before the model loads). Returns the scores on rank 0 (what ``scores.json`` holds)
    and ``{}`` on the other ranks. Bad input -> ``EvalError``; an example that cannot run
    becomes an error row, never an exception, unless every example this call tried failed: then ``EvalError``.
    """
    bench = get_benchmark(bench)
    split = split or bench.default_split
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    latent = _latent_mode(model, latent)
    generation = latent_kwargs(model, latent)
    if images not in ("on", "off"):
        raise EvalError(f"images must be 'on' or 'off', got {images!r}")
    baselines = _gain_runs(bench, split, gain_against, leakage_against)
    if batch_size < 1 or max_new_tokens < 1:
        raise EvalError(f"batch_size and max_new_tokens must be positive, got {batch_size} and {max_new_tokens}")
    if examples is None:
        examples = load_examples(bench, None if data is None else str(data), split, prompt, allow_outside)
    examples = examples[:limit]
    out = Path(out)
    settings = {"model": _where(model.backbone.model.name_or_path), "method": model.method.name,
                **_run_settings(bench, data, split, prompt, latent, max_new_tokens, images)}
    _claim(out, settings)

    own = out / (PREDICTIONS if world_size == 1 else f"predictions.rank{rank}.jsonl")
    _drop_partial_line(own)
    done = {row["id"] for row in _all_rows(out) if row["error"] is None}
    shard = examples[rank::world_size]
    todo = [ex for ex in shard if ex.id not in done]
    desc = bench.name if world_size == 1 else f"{bench.name} rank {rank}/{world_size}"
    errors = []
    with open(own, "a", encoding="utf-8") as f, tqdm(total=len(shard), initial=len(shard) - len(todo), desc=desc,
                                                      unit="ex", position=rank, disable=not progress) as bar:
        for i in range(0, len(todo), batch_size):
            rows = _run_batch(model, bench, todo[i:i + batch_size], max_new_tokens, generation, images == "on")
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            f.flush()
            bar.update(len(rows))
            errors += [row for row in rows if row["error"] is not None]
    if todo and len(errors) == len(todo):
        raise EvalError(f"all {len(todo)} examples this run tried failed, so nothing was scored; the first, "
                        f"example {errors[0]['id']!r}: {errors[0]['error']} (fix the cause and rerun: failed rows "
                        "are retried)")
    if rank != 0:
        return {}
    rows = _merge(out, examples)
    scores = score(bench, rows)
    if baselines:
        scores["multimodal_gain"] = mmstar_gain_leakage(scores, *baselines)
    _write_json(out / "scores.json", scores)
    if bench.kind == "mmmu" and split == "test":  # answers withheld: the file to submit is the result
        _write_json(out / SUBMISSION, mmmu_submission(examples, rows))
    write_report(out, bench.kind, settings, scores, rows)
    return scores


def _gain_runs(bench: Benchmark, split: str, gain_against, leakage_against) -> tuple[dict, ...]:
    """The finished no-image runs the multi-modal gain / leakage compare against: (S_wv scores[, S_t scores])."""
    if gain_against is None:
        if leakage_against is not None:
            raise EvalError("leakage_against needs gain_against too (ML = max(0, S_wv - S_t))")
        return ()
    if bench.kind != "mmstar":
        raise EvalError(f"multi-modal gain / leakage are MMStar's measures, not {bench.name}'s")
    runs = []
    for name, folder in (("gain_against", gain_against), ("leakage_against", leakage_against)):
        if folder is None:
            continue
        folder = Path(folder)
        if not (folder / "scores.json").is_file() or not (folder / "run.json").is_file():
            raise EvalError(f"{name} {str(folder)!r} is not a finished eval folder (no scores.json / run.json)")
        settings = _read_json(folder / "run.json")
        if settings.get("bench") != bench.name or settings.get("split") != split or settings.get("images") != "off":
            raise EvalError(f"{name} {str(folder)!r} must be a {bench.name} {split} run with --images off; it is "
                            f"{settings.get('bench')} {settings.get('split')} with images {settings.get('images')}")
        runs.append(_read_json(folder / "scores.json"))
    return tuple(runs)


def _latent_mode(model: LatentVLM, latent: str | None) -> str:
    if latent is None:
        return "auto"
    if latent not in LATENT_MODES:
        raise EvalError(f"latent must be one of {', '.join(LATENT_MODES)}, got {latent!r}")
    if latent == "on" and not model.method.uses_latents:
        raise EvalError(f"--latent on needs a method with latent tokens; {model.method.name!r} has none")
    return latent


def latent_kwargs(model: LatentVLM, latent: str) -> dict:
    """The ``generate`` arguments of a ``--latent`` mode (``auto`` / ``on`` / ``off``, see the module docstring), for
    callers that generate outside ``evaluate`` with the same settings (interventions, figures)."""
    if latent not in LATENT_MODES:
        raise EvalError(f"latent must be one of {', '.join(LATENT_MODES)}, got {latent!r}")
    uses = model.method.uses_latents
    if latent == "on":
        if not uses:
            raise EvalError(f"--latent on needs a method with latent tokens; {model.method.name!r} has none")
        return {"prefix": model.method.config.latent_start_token}
    return {"allow_latents": False} if latent == "off" and uses else {}


def _run_settings(bench: Benchmark, data, split: str, prompt: str, latent: str, max_new_tokens: int,
                 images: str) -> dict:
    """What ``run.json`` records of a run besides the model and method (known before the model loads)."""
    return {"bench": bench.name, "data": _where(data or bench.hub_id), "split": split, "prompt": prompt,
            "latent": latent, "max_new_tokens": max_new_tokens, "images": images}


def _where(path_or_id) -> str:
    """A local path made absolute (so the same run is recognised from another working folder), a hub id as is."""
    return str(Path(path_or_id).expanduser().resolve()) if Path(path_or_id).expanduser().exists() else str(path_or_id)


# ---------------------------------------------------------------------------------------------------------------------
# One batch


def _run_batch(model: LatentVLM, bench: Benchmark, batch: list[Example], max_new_tokens: int,
               generation: dict | None = None, with_images: bool = True) -> list[dict]:
    """Prediction rows for ``batch``, in order. ``generation``: ``latent_kwargs`` of the run's latent mode. An example
    whose row is bad, whose image does not decode or whose generation fails on its own becomes an error row; the
    others are generated together."""
    rows, ready, images = {}, [], []
    start = time.perf_counter()
    for ex in batch:
        reason = ex.error
        if reason is None:
            try:
                images.append(ex.open_images() if with_images else [])
                ready.append(ex)
                continue
            except ImageError as e:
                reason = str(e)
        rows[ex.id] = _error_row(ex, reason)
    results = _generate(model, ready, images, max_new_tokens=max_new_tokens, **(generation or {}))
    seconds = (time.perf_counter() - start) / max(len(ready), 1)
    for ex, result in zip(ready, results):
        rows[ex.id] = _row(bench, ex, result, seconds) if isinstance(result, Generation) else _error_row(ex, result)
    return [rows[ex.id] for ex in batch]


def _generate(model: LatentVLM, examples: list[Example], images: list, **kwargs) -> list[Generation | str]:
    """One ``Generation`` per example; if the batch fails, each example alone, so a failure costs only the example
    that causes it (its entry is then the reason)."""
    if not examples:
        return []
    try:
        return model.generate(images, [ex.prompt for ex in examples], **kwargs)
    except Exception as e:  # a prompt too long, out of memory, ...: whatever it is, it must not take the batch down
        if len(examples) == 1:
            return [f"generation failed: {type(e).__name__}: {e}"]
        return [_generate(model, [ex], [image], **kwargs)[0] for ex, image in zip(examples, images)]


def _row(bench: Benchmark, ex: Example, gen: Generation, seconds: float) -> dict:
    return {"id": ex.id, **ex.info, "answer": ex.answer, "output": gen.text, **judge(bench, ex, gen.text),
            "latent_tokens": sum(seg.k for seg in gen.latent_segments),
            "text_tokens": sum(len(seg.token_ids) for seg in gen.segments if isinstance(seg, TextSegment)),
            "finish": gen.finish_reason, "seconds": round(seconds, 4), "error": None}


def _error_row(ex: Example, reason: str) -> dict:
    return {"id": ex.id, **ex.info, "answer": ex.answer, "output": None, "parsed": None, "fallback": False,
            "correct": False, "latent_tokens": 0, "text_tokens": 0, "finish": None, "seconds": 0.0, "error": reason}


# ---------------------------------------------------------------------------------------------------------------------
# The output folder


def _claim(out: Path, settings: dict) -> None:
    """Record the settings in ``OUT/run.json``, or check that a rerun has the same ones (rows made with other
    settings would be mixed into one score)."""
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.json"
    if not path.is_file():
        _write_json(path, settings)
        return
    _check_settings(out, settings)


def _check_settings(out: Path, settings: dict) -> None:
    """Refuse ``out`` when its ``run.json`` differs from ``settings`` in any of their keys."""
    old = _read_json(out / "run.json")
    changed = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]
    if changed:
        raise EvalError(f"{out} holds a run with other settings ({'; '.join(changed)}); choose another --out")


def _read_json(path: Path) -> dict:
    """A JSON object ``vlatent eval`` wrote (``run.json``, ``scores.json``); one cut short or altered is named."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        value = f"{type(e).__name__}: {e}"
    if not isinstance(value, dict):
        raise EvalError(f"{path} is corrupt, not the JSON object vlatent eval writes ({value}); restore it or use "
                        "another folder")
    return value


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # several ranks may write run.json at once
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _drop_partial_line(path: Path) -> None:
    """Cut a line left half-written by a killed run, so appended rows start on a line of their own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _read_rows(path: Path) -> list[dict]:
    """The rows of one predictions file; a last line without its newline is still being written (or was cut) and is
    left out."""
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    rows = []
    for n, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise EvalError(f"{path} line {n}: not a JSON row ({e}); delete the line to redo that example") from None
    return rows


def _all_rows(out: Path) -> list[dict]:
    files = [out / PREDICTIONS, *sorted(out.glob("predictions.rank*.jsonl"))]
    return [row for f in files if f.is_file() for row in _read_rows(f)]


def _merge(out: Path, examples: list[Example]) -> list[dict]:
    """Wait until every example has a row in some predictions file (the other ranks are still writing theirs), then
    write all rows, each id once (its prediction over an error row from an earlier try) and in dataset order, to
    ``predictions.jsonl`` and remove the rank files."""
    ids = {ex.id for ex in examples}
    missing = ids - {row["id"] for row in _all_rows(out)}
    if missing:
        print(f"waiting for the other ranks: {len(missing)} examples to go", file=sys.stderr)
    while missing:
        time.sleep(POLL_SECONDS)
        missing = ids - {row["id"] for row in _all_rows(out)}
    rows: dict[str, dict] = {}
    for row in _all_rows(out):
        if row["id"] not in rows or rows[row["id"]]["error"] is not None:  # a prediction is never replaced
            rows[row["id"]] = row
    order = {ex.id: i for i, ex in enumerate(examples)}
    merged = sorted(rows.values(), key=lambda row: order.get(row["id"], len(order)))
    tmp = out / f"{PREDICTIONS}.tmp"
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in merged), encoding="utf-8")
    os.replace(tmp, out / PREDICTIONS)
    for path in out.glob("predictions.rank*.jsonl"):
        path.unlink()
    return merged


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlatent eval", description="Evaluate a LatentVLM on MMMU, MMStar or a synthetic "
                                "task: batched, resumable, shardable with torchrun. See eval/README.md.")
    p.add_argument("--model", required=True, help="vlatent checkpoint folder or hub id")
    p.add_argument("--method", default=None, help="latent method, for a base VLM without vlatent_config.json")
    p.add_argument("--bench", required=True, type=_benches, metavar="NAME[,NAME...]",
                   help=f"one or several of {', '.join(BENCHMARKS)}, comma separated; several: each into OUT/NAME, "
                        "with OUT/summary.md")
    p.add_argument("--data", action="append", default=None,
                   help="hub id, folder of the hub's parquet files, or one .parquet / .tsv (VLMEvalKit) / .jsonl file "
                        "(default: the benchmark's hub id); for a synthetic task, a folder written by `vlatent "
                        "build-data`. With several benchmarks: once for all, or once per benchmark in --bench order")
    p.add_argument("--out", required=True, help="output folder; rerunning into it resumes")
    p.add_argument("--split", action="append", default=None,
                   help="default: validation (MMMU), val (MMStar), test (synthetic); MMMU test also writes "
                        "submission.json. With several benchmarks: once for all, or once per benchmark")
    p.add_argument("--batch-size", type=_positive, default=8, help="examples per generation batch (default: 8)")
    p.add_argument("--max-new-tokens", type=_positive, default=256,
                   help="positions generated per answer, latent steps included (default: 256)")
    p.add_argument("--latent", choices=LATENT_MODES, default="auto",
                   help="auto (default): the model opens latent segments where it chooses, as trained; on: start "
                        "each answer in latent mode (methods with latent tokens); off: never open a latent segment "
                        "(text only)")
    p.add_argument("--images", choices=("on", "off"), default="on",
                   help="off: withhold the images (MMStar's S_wv / S_t runs for the multi-modal gain and leakage)")
    p.add_argument("--gain-against", default=None, metavar="DIR",
                   help="MMStar: an --images off run of this model; adds the multi-modal gain to the scores")
    p.add_argument("--leakage-against", default=None, metavar="DIR",
                   help="MMStar: an --images off run of the LLM base; adds the multi-modal leakage")
    p.add_argument("--limit", type=_positive, default=None, help="evaluate the first N examples only")
    p.add_argument("--prompt", choices=PROMPTS, default="official",
                   help="MMMU / MMStar prompt template (default: official)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: as saved in the checkpoint")
    p.add_argument("--device", type=_device, default=None,
                   help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--max-failures", type=_count, default=0, metavar="N",
                   help="exit non-zero when more than N examples end as error rows (default: 0); the scores are "
                        "written either way and a rerun into --out retries the failed rows")
    p.add_argument("--allow-outside", action="append", default=[], metavar="PATH",
                   help="let image paths in --data lead into this folder too (repeatable); by default they must lie "
                        "in the data file's folder")
    return p


def _benches(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    for name in names:
        if name not in BENCHMARKS:
            raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(BENCHMARKS)})")
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"a benchmark is named twice in {text!r}")
    return names


def _per_bench(flag: str, values: list | None, benches: list[str]) -> list:
    """One value of a repeatable option per benchmark: none (defaults), one for all, or one each in order."""
    if not values:
        return [None] * len(benches)
    if len(values) in (1, len(benches)):
        return values * len(benches) if len(values) == 1 else values
    raise EvalError(f"{flag} is given {len(values)} times for {len(benches)} benchmarks ({', '.join(benches)}); give "
                    "it once for all of them or once per benchmark, in --bench order")


def _device(text: str) -> str:
    """A device this machine has (an empty tensor is made on it), checked before the model loads."""
    if text.split(":")[0] == "meta":  # torch makes tensors there, but they hold no data to generate from
        raise argparse.ArgumentTypeError(f"{text!r} holds no data (shapes only): use cpu, cuda or another device")
    try:
        torch.empty(0, device=text)
    except Exception as e:  # RuntimeError for a bad name or no driver, NotImplementedError, AssertionError, ...
        raise argparse.ArgumentTypeError(f"{text!r} is not a device of this machine ({type(e).__name__}: "
                                         f"{(str(e).splitlines() or [''])[0]})") from None
    return text


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2), already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    benches, many = args.bench, len(args.bench) > 1
    try:
        datas, splits = _per_bench("--data", args.data, benches), _per_bench("--split", args.split, benches)
        if many and (args.gain_against or args.leakage_against):
            raise EvalError("--gain-against / --leakage-against compare one MMStar run: use them with --bench mmstar")
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    outs = {bench: Path(args.out) / bench if many else Path(args.out) for bench in benches}
    results, ready = {}, {}
    for bench, data, split in zip(benches, datas, splits):  # the data and run.json are read before the model loads
        results[bench] = (split or BENCHMARKS[bench].default_split, None)
        try:
            if (outs[bench] / "run.json").is_file():  # the settings known without the model (it adds its own)
                _check_settings(outs[bench], _run_settings(BENCHMARKS[bench], data, results[bench][0], args.prompt,
                                                          args.latent or "auto", args.max_new_tokens, args.images))
            ready[bench] = load_examples(BENCHMARKS[bench], data, results[bench][0], args.prompt, args.allow_outside)
        except EvalError as e:  # with several benchmarks the others still run; the command fails at the end
            print(f"error: {bench + ': ' if many else ''}{e}", file=sys.stderr)
            results[bench] = (results[bench][0], str(e))
    try:
        model = _load_model(args) if ready else None
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = False  # more error rows than --max-failures in some benchmark
    for bench, data in zip(benches, datas):
        if bench not in ready:
            continue
        split, out = results[bench][0], outs[bench]
        try:
            scores = evaluate(model, bench, data, out, split=split, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, latent=args.latent, limit=args.limit,
                              prompt=args.prompt, images=args.images, gain_against=args.gain_against,
                              leakage_against=args.leakage_against, examples=ready[bench])
        except EvalError as e:
            print(f"error: {bench + ': ' if many else ''}{e}", file=sys.stderr)
            results[bench] = (split, str(e))
            continue
        results[bench] = (split, scores)
        if scores:
            print(f"{bench}: {100 * scores['overall']:.2f}% of {scores['num']} ({scores['errors']} errors); "
                  f"{out / 'report.md'}")
            if scores["errors"] > args.max_failures:
                failed = True
                print(f"error: {bench}: {scores['errors']} examples failed (more than --max-failures "
                      f"{args.max_failures}): their rows in {out / 'predictions.jsonl'} say why; rerun into {out} to "
                      "retry them", file=sys.stderr)
    if many and int(os.environ.get("RANK", 0)) == 0:
        print(write_summary(Path(args.out), results))
    return 2 if failed or any(isinstance(scores, str) for _, scores in results.values()) else 0


def _load_model(args) -> LatentVLM:
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    try:
        model = LatentVLM.from_pretrained(args.model, method=args.method,
                                          dtype=getattr(torch, args.dtype) if args.dtype else None)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(f"--model {args.model!r}: {e}") from None
    return model.to(device).eval()


if __name__ == "__main__":
    sys.exit(main())
