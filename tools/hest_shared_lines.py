#!/usr/bin/env python
"""Print every line a project shares with HEST's files at one commit (after normalising whitespace).

Usage: python tools/hest_shared_lines.py PROJECT_ROOT HEST_GIT_DIR [COMMIT]
(HEST_GIT_DIR: a clone of github.com/mahmoodlab/HEST, its .git folder or a bare mirror)

Lines are compared with all whitespace removed.  Every text file of HEST at COMMIT is read (for notebooks,
the cells' source lines); every file git tracks or would track in PROJECT_ROOT is read the same way.
Printed: each shared line that is not trivial, as  project_file:line  <->  hest_file:line  text.
Trivial (listed here, nothing else is skipped): blank lines, import statements, lines made only of
brackets / punctuation, Markdown code fences, and lines of at most MAX_WORDS (2) words -- identifiers, keywords
or numbers, e.g. `return None`, `model.eval()`, `path,`, `def __init__(`, `[project]`. Three pyproject.toml
lines that packaging standards spell one way (SPEC_FIXED) are listed on stderr as allowed, not counted.  Exit status 1 when anything was printed.
"""

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

TRIVIAL_WORDS = {
    "return",
    "else:",
    "try:",
    "pass",
    "break",
    "continue",
    "finally:",
    '"""',
    "'''",
    "#",
    "*/",
    "/*",
}
IMPORT = re.compile(
    r"^\s*(import\s+[\w.]+(\s+as\s+\w+)?(\s*,\s*[\w.]+(\s+as\s+\w+)?)*|from\s+[\w.]+\s+import\s+.*)\s*$"
)
PUNCT = re.compile(r"^[\s()\[\]{},:;.]*$")


def norm(line):
    return re.sub(r"\s+", "", line)


#: lines a packaging standard spells one way (PEP 517's setuptools backend, PEP 621 and setuptools' table names):
#: reported on stderr as allowed, with where they are, never silently dropped
SPEC_FIXED = {
    'build-backend="setuptools.build_meta"',
    "[project.optional-dependencies]",
    "[tool.setuptools.packages.find]",
}
WORD = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|\d+")
MAX_WORDS = 2


def trivial(line):
    """Blank, an import, punctuation only, a lone keyword, or at most MAX_WORDS words (`return None`, `path,`)."""
    s = line.strip()
    return (
        not s
        or PUNCT.match(s)
        or IMPORT.match(s)
        or s in TRIVIAL_WORDS
        or s.startswith("```")
        or len(WORD.findall(s)) <= MAX_WORDS
    )


def lines_of(name, data):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return []  # binary (images, model weights)
    if name.endswith(".ipynb"):
        try:
            cells = json.loads(text).get("cells", [])
        except json.JSONDecodeError:
            return text.splitlines()
        out = []
        for cell in cells:
            src = cell.get("source", [])
            out.extend("".join(src).splitlines() if isinstance(src, list) else src.splitlines())
        return out
    return text.splitlines()


def main():
    root, hest_git = Path(sys.argv[1]), sys.argv[2]
    commit = sys.argv[3] if len(sys.argv) > 3 else "afd42c3143092c51e6bcc0f1df65bbf58a467e5e"
    git = ["git", "--git-dir", hest_git]
    names = subprocess.run(
        git + ["ls-tree", "-r", "--name-only", commit], check=True, capture_output=True, text=True
    ).stdout.split("\n")
    hest = defaultdict(list)  # normalised line -> [(file, lineno)]
    for name in filter(None, names):
        got = subprocess.run(git + ["show", f"{commit}:{name}"], capture_output=True)
        if got.returncode:  # a large binary the snapshot lists but does not hold
            print(f"# not in the snapshot, skipped: {name}", file=sys.stderr)
            continue
        data = got.stdout
        for i, line in enumerate(lines_of(name, data), 1):
            if not trivial(line):
                hest[norm(line)].append((name, i))
    files = subprocess.run(
        ["git", "-C", str(root), "ls-files", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    shared, allowed = 0, []
    for rel in filter(None, files):
        path = root / rel
        if not path.is_file():
            continue
        for i, line in enumerate(lines_of(rel, path.read_bytes()), 1):
            if trivial(line):
                continue
            where = hest.get(norm(line))
            if where and rel == "pyproject.toml" and norm(line) in SPEC_FIXED:
                allowed.append(f"{rel}:{i}  {line.strip()}")
            elif where:
                shared += 1
                print(f"{rel}:{i}  <->  {where[0][0]}:{where[0][1]}  {line.strip()}")
    for a in allowed:
        print(f"# allowed (spelled so by a packaging standard): {a}", file=sys.stderr)
    print(f"# {shared} shared non-trivial line(s); HEST commit {commit}", file=sys.stderr)
    return 1 if shared else 0


if __name__ == "__main__":
    sys.exit(main())
