"""Where the files that ship with vlatent live, in a source checkout and in an install alike: the apps
(``data_builders``, ``train``, ``eval``, ``demo``) with their recipes and DeepSpeed configs, and the package's assets.

An install puts the apps under ``vlatent/_apps/`` (setup.py's ``package_dir``), so no generic top-level name such as
``train`` or ``eval`` lands in site-packages; a checkout has them beside ``vlatent/``."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
RECIPES = "train/recipes"
DS_CONFIGS = "train/ds_configs"
APPS = ("data_builders", "train", "eval", "demo")


def apps_root() -> Path:
    """The folder that holds ``train/``, ``eval/``, ``demo/`` and ``data_builders/``."""
    installed = PACKAGE / "_apps"
    return installed if installed.is_dir() else PACKAGE.parent


def is_shipped(path: Path) -> bool:
    """Whether ``path`` is one of the recipes that ship with vlatent (their data and output paths are the user's)."""
    return (apps_root() / RECIPES).resolve() in Path(path).resolve().parents


def locate(value: str | Path, base: Path | None = None) -> Path | None:
    """``value`` as an existing file or folder, absolute: as given if absolute, else relative to ``base`` (default: the
    current folder), else, for a path into vlatent's own folders (``vlatent/assets/tiny_base``,
    ``train/ds_configs/zero2.json``), the install's copy. None when there is none."""
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [(base or Path.cwd()) / p]
    if not p.is_absolute() and p.parts[0] in APPS:
        candidates.append(apps_root() / p)
    if not p.is_absolute() and p.parts[0] == PACKAGE.name:
        candidates.append(PACKAGE.parent / p)
    return next((c.resolve() for c in candidates if c.exists()), None)


def find_file(value: str | Path, what: str, folder: str, suffix: str, base: Path | None = None) -> Path:
    """An existing file given as a path (see ``locate``) or by the name of a shipped one under ``folder``
    (``mirage_stage1``, ``tiny/mirage_stage1``, ``zero2``); returned absolute."""
    p = Path(value).expanduser()
    named = apps_root() / folder / (p if p.suffix == suffix else p.with_name(p.name + suffix))
    found = locate(p, base) or (named.resolve() if named.is_file() else None)
    if found is not None and found.is_file():
        return found
    shipped = sorted(str(f.relative_to(apps_root() / folder).with_suffix(""))
                     for f in (apps_root() / folder).rglob(f"*{suffix}") if "learning" not in f.parts)  # bench configs
    raise FileNotFoundError(f"{what} {str(value)!r} does not exist (looked in {base or Path.cwd()}, the vlatent "
                            f"install and the shipped {what}s: {', '.join(shipped)})")
