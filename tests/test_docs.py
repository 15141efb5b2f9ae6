"""The documentation a user reads: its examples are valid, and no link leaves the repository."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from vlatent.data import load_records

ROOT = Path(__file__).resolve().parents[1]


def test_every_record_example_in_docs_records_md_loads(tmp_path):
    """Each ```json block of docs/records.md is a record load_records accepts (the images need not exist here)."""
    blocks = re.findall(r"```json\n(.+?)\n```", (ROOT / "docs" / "records.md").read_text(), re.S)
    assert len(blocks) >= 3
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(json.loads(b)) + "\n" for b in blocks))
    records = load_records(tmp_path / "r.jsonl", check_images=False)
    kinds = {c["type"] for r in records for m in r["messages"] for c in m["content"]}
    assert kinds == {"text", "image", "latent"} and any(m["role"] == "system" for m in records[1]["messages"])


def tracked_markdown() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.md"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    return [ROOT / f for f in out]


@pytest.mark.parametrize("path", tracked_markdown(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_link_leaves_the_repository(path):
    """Relative links and paths in backquotes that point above the repository (``../shared/...``) break for every
    reader of a clone; links inside it must exist."""
    text = path.read_text()
    for target in re.findall(r"\]\(([^)\s#]+)", text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        resolved = (path.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{path.name}: link {target!r} leaves the repository"
        assert resolved.exists(), f"{path.name}: link {target!r} does not exist"
    assert "../shared" not in text and "DESIGN.md" not in text, f"{path.name} points at the developers' notes"
