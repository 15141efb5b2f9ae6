"""Check a built dataset with vlatent's own loader and print a summary of every split.

    vlatent build-data validate data/maze [--allow-outside PATH]

Each split must pass ``vlatent.data.load_records`` (the error names the record and the field) and match the counts in
``dataset_info.json``; images must lie in the dataset folder unless ``--allow-outside`` names theirs.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

from . import common


def spread(values: list[int]) -> str:
    return f"min {min(values)}  mean {sum(values) / len(values):.1f}  max {max(values)}" if values else "-"


def tally(counter: Counter, top: int = 12) -> str:
    shown = " · ".join(f"{k} {v}" for k, v in sorted(counter.most_common(top)))
    return shown + (f" · ... {len(counter) - top} more" if len(counter) > top else "")


def validate(args) -> None:
    from vlatent.data import RecordError, load_records

    folder = args.dir
    splits = [s for s in common.SPLITS if (folder / f"{s}.jsonl").is_file()]
    if not splits:
        raise common.BuildError(f"no {', '.join(f'{s}.jsonl' for s in common.SPLITS)} in {folder}")
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else None
    print(f"{folder}: " + (f"{info['builder']} v{info['version']}, seed {info['seed']}" if info
                           else "no dataset_info.json (not written by a builder, or the build did not finish)"))
    total = 0
    for split in splits:
        try:
            records = load_records(folder, split=split, allow_outside=args.allow_outside)
        except RecordError as e:
            raise common.BuildError(str(e)) from None
        if info and info["counts"].get(split) != len(records):
            raise common.BuildError(f"dataset_info.json says {split} has {info['counts'].get(split)} records, "
                                    f"{split}.jsonl has {len(records)}")
        latents = [sum(c["type"] == "latent" for m in r["messages"] for c in m["content"]) for r in records]
        print(f"{split}: {len(records)} records")
        print(f"  tasks          {tally(Counter(r.get('task') for r in records))}")
        print(f"  answers        {tally(Counter(str(r.get('answer')) for r in records))}")
        print(f"  images/record  {spread([len(r['images']) for r in records])}")
        print(f"  latents/record {spread(latents)}")
        total += len(records)
    print(f"ok: {total} records in {len(splits)} split(s) pass load_records")


def main(argv: list[str] | None = None) -> int:
    p = common.tool_parser("validate", __doc__)
    p.add_argument("dir", type=common.existing_dir, help="the dataset folder")
    p.add_argument("--allow-outside", type=common.existing_dir, action="append", default=[], metavar="PATH",
                   help="let records read images from this folder too (repeatable); by default a record's images "
                        "must lie in the dataset folder")
    return common.run(p, validate, argv)


if __name__ == "__main__":
    sys.exit(main())
