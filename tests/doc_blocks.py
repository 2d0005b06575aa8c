"""The markdown files' links, headings and shell commands, as tests/test_docs.py checks them.

Fenced ``bash`` blocks may carry a marker in an HTML comment on the line before the fence (invisible
on GitHub):

- ``<!-- test: run -->``: the block runs on the CPU with no data set or weights from elsewhere, and
  tests/test_docs.py runs it as written, with ``bash -e``, in a scratch folder that holds the
  repository's code (the blocks of one page run in order, in one folder, so a later block can use
  what an earlier one wrote);
- ``<!-- test: ci -->``: the block is run by ``.ci/run``, line for line;
- ``<!-- test: run by tests/test_x.py -->``: that test file runs each of the block's commands as
  written (it holds each command line verbatim), with checks of its own on what they give.

Every other block's ``python`` and ``torchrun`` commands are parsed by their entry point's parser.
"""
import re
import shlex
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parents[1]

MARKER = re.compile(r'<!--\s*test:\s*(.*?)\s*-->')
FENCE = re.compile(r'^(\s*)(`{3,}|~{3,})\s*([\w+-]*)')


@dataclass
class Block:
    path: Path          # the markdown file
    line: int           # 1-based line of the opening fence
    lang: str
    text: str
    marker: Optional[str]

    @property
    def where(self) -> str:
        return f'{_shown(self.path)}:{self.line}'


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def markdown_files() -> List[Path]:
    """Every markdown file of the repository, outside hidden folders and run outputs."""
    skip = {'output', 'node_modules', 'tmp'}
    return sorted(p for p in ROOT.rglob('*.md')
                  if not any(part.startswith('.') or part in skip for part in p.relative_to(ROOT).parts[:-1]))


def split_fences(text: str):
    """(prose lines with their line numbers, code blocks): the prose with every fenced block removed."""
    prose, blocks = [], []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, lang, start = m.group(2), m.group(3), i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        marker = None
        if start and MARKER.search(lines[start - 1]):
            marker = MARKER.search(lines[start - 1]).group(1)
        blocks.append((start + 1, lang, '\n'.join(body), marker))
    return prose, blocks


def code_blocks(path: Path) -> List[Block]:
    _, blocks = split_fences(path.read_text())
    return [Block(path, line, lang, text, marker) for line, lang, text, marker in blocks]


# ------------------------------------------------------------------------------ anchors and links

def _heading_text(raw: str) -> str:
    """The text GitHub renders for a heading's markdown: links by their text, no emphasis or code marks."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', raw)
    text = re.sub(r'<[^>]+>', '', text)
    return text.replace('`', '').replace('*', '').strip()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case; letters, digits, marks, '-' and '_' kept, each space
    made '-', everything else dropped."""
    text = _heading_text(heading).lower()
    kept = ''.join(c for c in text if c in ' -' or unicodedata.category(c)[0] in 'LNM'
                   or unicodedata.category(c) == 'Pc')
    return kept.replace(' ', '-')


def anchors(path: Path) -> Set[str]:
    """The anchors a markdown file offers: its headings' slugs (repeats get -1, -2, ... as on GitHub)
    and explicit ``id``/``name`` attributes."""
    prose, _ = split_fences(path.read_text())
    found, seen = set(), {}
    for _, line in prose:
        m = re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            found.add(base if n == 0 else f'{base}-{n}')
            seen[base] = n + 1
        for a in re.findall(r'<a\s[^>]*(?:name|id)="([^"]+)"', line):
            found.add(a)
    return found


LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
REFERENCE = re.compile(r'^\s{0,3}\[[^\]]+\]:\s*(\S+)')


def links(path: Path):
    """(line, target) of every markdown link and image in the prose (not in code spans or blocks)."""
    prose, _ = split_fences(path.read_text())
    for number, line in prose:
        line = re.sub(r'`[^`]*`', '', line)
        for target in LINK.findall(line):
            yield number, target
        m = REFERENCE.match(line)
        if m:
            yield number, m.group(1)


def broken_link(path: Path, target: str, anchor_cache: Dict[Path, Set[str]]) -> Optional[str]:
    """Why a relative link does not resolve, or None when it does (or is not relative)."""
    if re.match(r'^[a-z][a-z0-9+.-]*:', target, re.I) or target.startswith('//'):
        return None  # http:, https:, mailto: ...
    file_part, _, anchor = target.partition('#')
    dest = (path.parent / file_part).resolve() if file_part else path
    if not dest.exists():
        return f'{file_part} does not exist'
    if anchor:
        if dest.suffix.lower() != '.md':
            return f'#{anchor} points into {file_part}, which is not a markdown file'
        if dest not in anchor_cache:
            anchor_cache[dest] = anchors(dest)
        if anchor not in anchor_cache[dest]:
            return f'{_shown(dest)} has no heading with the anchor #{anchor}'
    return None


# ----------------------------------------------------------------------------------- commands

def commands(block_text: str) -> List[List[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped, split at
    ``&&``, ``||``, ``;`` and ``|``; ``VAR=value`` prefixes removed."""
    joined = re.sub(r'\\\n', ' ', block_text)
    found = []
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=';&|')
        lexer.whitespace_split = True
        lexer.commenters = '#'
        current: List[str] = []
        for token in lexer:
            if token in {'&&', '||', ';', '|', '&'}:
                found.append(current)
                current = []
            else:
                current.append(token)
        found.append(current)
    cleaned = []
    for argv in found:
        while argv and re.match(r'^[A-Za-z_][A-Za-z0-9_]*=', argv[0]):
            argv = argv[1:]
        if argv:
            cleaned.append(argv)
    return cleaned


def shell_lines(block_text: str) -> List[str]:
    """The block's command lines, continuations joined and whitespace collapsed, comments dropped."""
    joined = re.sub(r'\\\n', ' ', block_text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith('#'):
            out.append(' '.join(line.split()))
    return out


# ------------------------------------------------------------------------- running the run blocks

# Repository entries a scratch folder does not link: what commands write there stays in the scratch.
NOT_LINKED = {'docs', 'tests', 'output'}


def scratch_folder(folder: Path) -> Path:
    """A folder in which the documented commands see the repository's code as in a clone (each
    top-level file and package linked), while what they write (data, output/, figures) stays there."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if not entry.name.startswith('.') and entry.name not in NOT_LINKED and not (folder / entry.name).exists():
            (folder / entry.name).symlink_to(entry)
    return folder


def run_block(block: Block, folder: Path, timeout: int = 3600):
    """Run one block as written, with ``bash -e -o pipefail``, in the scratch folder."""
    import os
    import subprocess
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    return subprocess.run(['bash', '-e', '-o', 'pipefail', '-c', block.text], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_page(path: Path, folder: Path, prepare=None) -> List[tuple]:
    """Every ``test: run`` block of a page, in order, in one scratch folder: [(block, process)].
    ``prepare(block, folder)`` writes what a block reads from elsewhere (a data set) first. A block
    that fails is recorded, and the page's later blocks still run."""
    scratch_folder(folder)
    results = []
    for block in code_blocks(path):
        if block.marker == 'run':
            if prepare:
                prepare(block, folder)
            results.append((block, run_block(block, folder)))
    return results
