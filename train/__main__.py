"""`vlatent train sft|vlpo ...` / `python -m train sft|vlpo ...`: dispatch to the training entry points."""

import sys

USAGE = "usage: vlatent train {sft,vlpo} --config RECIPE.yaml [--set key=value ...] [--resume] [--overwrite]"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "sft":
        from train.sft import main as sft

        return sft(argv[1:])
    if argv[0] == "vlpo":
        from train.vlpo import main as vlpo

        return vlpo(argv[1:])
    print(f"error: unknown training entry point {argv[0]!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
