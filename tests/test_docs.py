"""The documentation: docs/cli.md is current, the README is short and opens with the two commands, and every
relative link in README.md, RESULTS.md and docs/*.md points to a file (and heading) that exists."""
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, ROOT / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]
# Written by another change (the fused op's builds, backends and speed, moved out of the README). Allowed
# only while it does not exist: once it does, links to it are checked like any other.
MAY_BE_MISSING = {ROOT / "docs" / "fused-op.md"}


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "docs" / "generate_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current():
    generator = load_generator()
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    written_with = re.search(r"\(Python (\d+\.\d+)\)", text)
    if written_with and written_with.group(1) != generator.PYTHON:
        pytest.skip(f"docs/cli.md was generated with Python {written_with.group(1)}, this is {generator.PYTHON}: "
                    "argparse lays out --help differently across versions")
    assert text == generator.render(), "docs/cli.md is stale: run `python docs/generate_cli.py` and commit it"


def test_generator_check_flags_a_stale_file(tmp_path, monkeypatch, capsys):
    generator = load_generator()
    stale = tmp_path / "cli.md"
    stale.write_text("# an old reference\n")
    monkeypatch.setattr(generator, "OUT", stale)
    monkeypatch.setattr(generator, "ROOT", tmp_path)
    assert generator.main(["--check"]) == 1
    assert "python docs/generate_cli.py" in capsys.readouterr().err
    assert stale.read_text() == "# an old reference\n"  # --check writes nothing
    assert generator.main([]) == 0 and generator.main(["--check"]) == 0


def test_readme_is_at_most_20_kb():
    size = len(README.read_bytes())
    assert size <= 20_000, f"README.md is {size} bytes: move details to docs/ or RESULTS.md"


def test_readme_opens_with_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    fences = [i for i, line in enumerate(lines) if line.startswith("```")]
    assert fences and fences[0] < 15, "the README's first code block must come within its first 15 lines"
    first_block = lines[fences[0] + 1:fences[1]]
    assert [line.split()[:2] for line in first_block] == [["make", "train"], ["make", "test"]]


def test_readme_has_no_test_counts_that_go_stale():
    text = README.read_text(encoding="utf-8")
    assert not re.search(r"\d+ (passed|skipped|failed)", text)


def without_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as dashes."""
    headings = re.findall(r"^#{1,6} +(.+?) *$", without_code(path.read_text(encoding="utf-8")), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def relative_links(path: Path):
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code(path.read_text(encoding="utf-8"))):
        if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            yield target


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files_that_exist(doc):
    broken = []
    for target in relative_links(doc):
        file, _, anchor = target.partition("#")
        resolved = (doc.parent / file).resolve() if file else doc
        if not resolved.exists():
            if resolved not in MAY_BE_MISSING:
                broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"
