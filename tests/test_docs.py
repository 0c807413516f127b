"""The README and docs/ stay true: links lead somewhere, and the commands they show run as
written as far as can be checked in seconds (heretic's options parse, benchmark scripts and
their flags exist, scripts exist). Long runs are not started."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from heretic.cli import subcommand_argv
from heretic.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```(?:bash)?\n(.*?)```", re.S)


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def commands(path: Path) -> list[list[str]]:
    """Each shell command in the page's code blocks, continuation lines joined, as words."""
    found = []
    for block in FENCE.findall(path.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
                words = words[1:]
            if words and words[-1] == "&":
                words = words[:-1]
            if words:
                found.append(words)
    return found


def test_readme_reads_in_five_minutes():
    assert len((ROOT / "README.md").read_text().splitlines()) < 200


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_lead_somewhere(page):
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page_id(page)} links to missing {target}"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page_id(page)}: no heading for #{anchor} in {file}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_heretic_commands_parse(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config.toml of the caller's
    for key in list(__import__("os").environ):
        if key.startswith("HERETIC_"):
            monkeypatch.delenv(key)
    for words in commands(page):
        if words[0] == "heretic" and "--help" not in words:
            # SystemExit / SettingsError on a wrong option or value
            load_settings(subcommand_argv(words[1:]))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_scripts_and_their_flags_exist(page):
    for words in commands(page):
        if words[0] == "bash" and words[1].startswith("scripts/"):
            assert (ROOT / words[1]).is_file(), f"{page_id(page)}: {words[1]} does not exist"
        if words[0] == "python" and words[1].startswith("benchmarks/"):
            script = ROOT / words[1]
            assert script.is_file(), f"{page_id(page)}: {words[1]} does not exist"
            source = script.read_text()
            for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
                assert f'"{flag}"' in source, f"{page_id(page)}: {words[1]} has no {flag}"


def test_every_heretic_option_shown_exists():
    """Inline `--option` mentions too, not only whole commands."""
    help_text = (ROOT / "config.default.toml").read_text()
    settings = set(re.findall(r"^#? ?(\w+) =", help_text, re.M))
    for page in PAGES:
        for code in re.findall(r"`(heretic [^`]+)`", page.read_text()):
            for flag in re.findall(r"--([\w.-]+)", code):
                name = flag.split(".")[0].replace("-", "_").removeprefix("no_")
                assert name in settings | {"help", "config"}, f"{page_id(page)}: {code}"
