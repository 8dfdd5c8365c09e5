"""The docs build without warnings or broken links, and every shell, file and config
snippet of the quickstart and the plugin tutorial runs as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)
RUN_IN_ORDER = ["docs/quickstart.md", "docs/plugin-tutorial.md"]


def blocks(markdown: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(markdown)]


def as_script(doc: Path) -> str:
    """Shell blocks run as they are; blocks starting with '# file: PATH' are written to PATH."""
    out = [f"echo '### {doc.name}'"]
    for lang, body in blocks(doc.read_text(encoding="utf-8")):
        first = body.splitlines()[0] if body.strip() else ""
        if first.startswith("# file: "):
            path = first[len("# file: "):].strip()
            out.append(f"mkdir -p \"$(dirname '{path}')\"\ncat > '{path}' <<'MQI_SNIPPET_EOF'\n{body}MQI_SNIPPET_EOF")
        elif lang == "sh":
            out.append(body)
        else:
            raise AssertionError(f"{doc.name}: a {lang or 'plain'} block that is neither a shell block nor a "
                                 f"'# file:' block cannot be tested:\n{body[:200]}")
    return "\n".join(out) + "\n"


def test_docs_build_strict(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "quickstart" / "index.html").is_file()


def test_the_built_site_loads_nothing_from_elsewhere(tmp_path):
    """Clinic networks are often offline: no script, style or font from a CDN (issue 19)."""
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    remote = re.compile(r"""<(?:script|link|img)[^>]+(?:src|href)=["'](?:https?:)?//""", re.I)
    for page in (tmp_path / "site").rglob("*.html"):
        found = remote.search(page.read_text(encoding="utf-8"))
        assert found is None, f"{page.relative_to(tmp_path)} loads {found.group(0)}"


def test_the_readme_tour_is_the_quickstart():
    """Issue 19: the README and the quickstart were two different tours; the README's lines
    are now the quickstart's, which the test below runs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## A tour", 1)[1].split("\n## ", 1)[0]
    tour = [line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip()]
    quickstart = {line.strip() for lang, body in blocks((ROOT / "docs/quickstart.md").read_text(encoding="utf-8"))
                  if lang == "sh" for line in body.splitlines()}
    assert len(tour) >= 5 and [line for line in tour if line not in quickstart] == []


def test_every_markdown_page_is_in_the_nav():
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = {list(item.values())[0] for item in nav}
    assert {p.name for p in (ROOT / "docs").glob("*.md")} <= listed


def test_quickstart_and_tutorial_run_as_written(tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(
        ".git", ".tox", ".venv", "build", "__pycache__", "*.egg-info", "test-artifacts", ".pytest_cache"))
    script = "".join(as_script(ROOT / doc) for doc in RUN_IN_ORDER)
    (tmp_path / "snippets.sh").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQI_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env["MQI_STANDIN_SECONDS"] = "0.3"
    proc = subprocess.run(["bash", "-euo", "pipefail", str(tmp_path / "snippets.sh")], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "demo passed" in proc.stdout
    assert "case-000004: done" in proc.stdout  # the quickstart's own case
    assert "2 passed" in proc.stdout  # the tutorial plugin's tests
