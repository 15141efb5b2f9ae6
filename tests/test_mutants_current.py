"""Every mutant in ``tests/mutants.py`` still finds the code it guards: a refactor that rewrites that line must update
the mutant (CI runs only the fast ones, so a stale slow mutant would otherwise go unnoticed)."""

from mutants import MUTANTS, ROOT


def test_every_mutants_original_text_occurs_once_in_its_file():
    stale = {m.name: (ROOT / m.path).read_text().count(m.original) for m in MUTANTS}
    assert {name: n for name, n in stale.items() if n != 1} == {}
