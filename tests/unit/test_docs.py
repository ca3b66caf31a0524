"""Code comments and docs point only at documents in the repository, and every anchor they
name exists (GitHub's heading slugs)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    heads = re.findall(r"^#+ (.+)$", doc.read_text(), flags=re.M)
    return {_slug(h) for h in heads}


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", *patterns], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return [ROOT / p for p in out.split() if "_proto" not in p]


def test_code_points_at_docs_that_exist() -> None:
    docs = {p.name: _anchors(p) for p in (ROOT / "docs").glob("*.md")}
    bad = []
    for path in _tracked("dht/*.py", "tests/*.py", "scripts/*", "protos/*"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"docs/([a-z_-]+\.md)(#[a-z0-9-]+)?((?:, #[a-z0-9-]+)*)", line):
                name = m.group(1)
                if name not in docs:
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {name}")
                    continue
                for anchor in re.findall(r"#([a-z0-9-]+)", (m.group(2) or "") + m.group(3)):
                    if anchor not in docs[name]:
                        bad.append(f"{path.relative_to(ROOT)}:{n}: {name}#{anchor}")
            if re.search(r"DESIGN (section|\d)|DESIGN\.md|BASELINES\.md", line):
                bad.append(f"{path.relative_to(ROOT)}:{n}: points outside the repository")
    assert bad == []


def test_links_between_docs_resolve() -> None:
    docs = {p.name: _anchors(p) for p in (ROOT / "docs").glob("*.md")}
    docs["README.md"] = _anchors(ROOT / "README.md")
    bad = []
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        here = path.name
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", path.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            name = Path(target).name if target else here
            if target and not (path.parent / target).exists():
                bad.append(f"{here}: {target}")
            elif anchor and name in docs and anchor not in docs[name]:
                bad.append(f"{here}: {target}#{anchor}")
    assert bad == []
