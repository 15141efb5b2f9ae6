"""``vlatent build-data NAME ARGS...`` or ``python -m data_builders NAME ARGS...``: run a builder, converter or tool."""

from __future__ import annotations

import importlib
import sys

from . import BUILDERS, CONVERTERS, PERCEPTION, TOOLS


def usage() -> str:
    lines = ["usage: vlatent build-data NAME [--help] ARGS...", ""]
    for title, names in (("synthetic tasks", BUILDERS), ("perception captions", PERCEPTION), ("converters", CONVERTERS),
                         ("tools", TOOLS)):
        lines.append(f"{title}:")
        for name in names:
            doc = importlib.import_module(f"data_builders.{name}").__doc__
            lines.append(f"  {name:10s} {doc.strip().splitlines()[0]}")
        lines.append("")
    lines.append("example: vlatent build-data maze --out data/maze --n 1000 --seed 0")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BUILDERS + PERCEPTION + CONVERTERS + TOOLS:
        print(f"error: unknown builder {name!r}; choose from {', '.join(BUILDERS + PERCEPTION + CONVERTERS + TOOLS)}",
              file=sys.stderr)
        return 2
    return importlib.import_module(f"data_builders.{name}").main(rest)


if __name__ == "__main__":
    sys.exit(main())
