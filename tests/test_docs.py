"""The front door: a short README that reaches every docs page in one click, links that resolve, and the
test command that CI runs written in the README."""

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield number, line


def links(line):
    """The targets of the Markdown links and images on a line, code spans left out."""
    return LINK.findall(re.sub(r"`[^`]*`", "``", line))


def heading_anchors(text):
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens,
    repeats numbered -1, -2, ..."""
    anchors, seen = set(), {}
    inside = False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        match = None if inside else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(page, root=REPO):
    text = page.read_text()
    broken = []
    for number, line in prose_lines(text):
        for target in links(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(root)}:{number}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest.read_text()):
                broken.append(f"{page.relative_to(root)}:{number}: {target} (no heading #{anchor})")
    return broken


def test_heading_anchors_follow_github():
    text = "# Title\n## `clear.apply_clear`\n## SD3 / SD3.5\n## CPU: torch.compile (2026-11-30)\n## SD3 / SD3.5\n"
    text += "```\n# not a heading\n```\n"
    assert heading_anchors(text) == {"title", "clearapply_clear", "sd3--sd35", "cpu-torchcompile-2026-11-30",
                                     "sd3--sd35-1"}


def test_broken_links_are_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n## Part one\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#part-one) [gone](docs/b.md) [no anchor](docs/a.md#part-two) "
                    "[web](https://example.com) `[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n")
    assert broken_links(page, root=tmp_path) == ["README.md:1: docs/b.md (no such file)",
                                                 "README.md:1: docs/a.md#part-two (no heading #part-two)"]


def test_readme_is_at_most_10_kb():
    assert README.stat().st_size <= 10 * 1024, f"README.md is {README.stat().st_size} bytes: move depth to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_every_docs_page_is_one_click_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, line in prose_lines(README.read_text())
              for t in links(line)}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_readme_test_command_is_the_one_ci_runs():
    text = README.read_text()
    section = re.search(r"^## Test\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Test' section"
    block = re.search(r"```bash\n(.*?)```", section.group(1), re.S)
    readme_commands = [line for line in block.group(1).splitlines() if line.strip()]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    ci_commands = [line for line in ci if line.startswith("python -m pytest")]
    assert len(readme_commands) == 1 and ci_commands == readme_commands
    assert readme_commands[0].split()[:4] == ["python", "-m", "pytest", "tests"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_prose_lines_fit_and_state_the_product(page):
    lines = list(prose_lines(page.read_text()))
    long = [n for n, line in lines if len(line) > 120 and not line.lstrip().startswith("|")]
    assert long == [], f"{page.name}: prose lines over 120 characters: {long}"
    split = [n for n, line in lines if line.count("`") % 2 and "```" not in line]
    assert split == [], f"{page.name}: a code span runs over a line break (keep it on one line): {split}"
    process = re.compile(r"\bissue \d+|\bon main\b|\bBars?:|\(bar [≤≥<>]", re.I)
    found = [line for _, line in prose_lines(page.read_text()) if process.search(line)]
    assert found == [], f"{page.name}: say what the product does, not how it was made: {found}"


def _resolve(dotted: str):
    """The object a dotted name (``clear.attention.ClearAttention.plan``) names: its longest importable module,
    then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError:
            continue
    for part in parts[i:]:
        obj = getattr(obj, part)
    return obj


def test_one_attention_call_takes_at_most_six_steps_each_a_real_function():
    """docs/architecture.md follows one attention call from the model's hook to the kernel in at most six
    numbered steps; every ``clear.`` name it gives is a real object a reader can jump to."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = re.search(r"^## One attention call, step by step\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "docs/architecture.md has no '## One attention call, step by step' section"
    steps = re.findall(r"^(\d+)\. ", section.group(1), re.M)
    assert 1 <= len(steps) <= 6 and steps == [str(i) for i in range(1, len(steps) + 1)]
    names = sorted(set(re.findall(r"`(clear(?:\.\w+)+)`", section.group(1))))
    assert len(names) >= len(steps)
    for name in names:
        assert callable(_resolve(name)) or isinstance(_resolve(name), type), name
