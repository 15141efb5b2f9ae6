"""`vlatent train sft|vlpo ...` / `python -m train sft|vlpo ...`: dispatch to the training entry points."""

import sys

ENTRY_POINTS = {  # name -> (module, one line for --help)
    "sft": ("train.sft", "supervised fine-tuning (every method and stage) from a YAML recipe"),
    "vlpo": ("train.vlpo", "RL (VLPO / GRPO over text and latent actions) from a recipe with a 'vlpo:' section"),
}
USAGE = ("usage: vlatent train {sft,vlpo} --config RECIPE [--set key=value ...] [--resume] [--overwrite]\n\n"
         "RECIPE is a YAML file or a shipped recipe's name (mirage_stage1, tiny/mirage_stage1).\n\nentry points:\n"
         + "".join(f"  {name:6s} {line}\n" for name, (_, line) in ENTRY_POINTS.items())
         + "\n`vlatent train sft --help` lists an entry point's options.")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] not in ENTRY_POINTS:
        print(f"error: unknown training entry point {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(ENTRY_POINTS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
