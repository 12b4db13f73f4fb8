"""Every ```python block of README.md and docs/*.md runs as written.

A page's blocks run in order in one namespace, as a reader reads the page: a later block may use what an earlier
one defined (the model, the optimizer, the batch). Each page starts from a fresh namespace and an empty working
directory, and every block from seed 0; what a block changes in the process (torch patched, a strategy
registered) is undone after it. Two HTML comments, invisible on the rendered page, mark the few blocks that
cannot run here, on the line right before the block:

* ``<!-- gpu: why -->``: needs CUDA; marked ``gpu``, so skipped without CUDA and run by the GPU suite;
* ``<!-- no-run: why -->``: not meant to run in one process (a torchrun script, a signature); always skipped.

A failing block names its page and line in the test id (``docs/clipper.md:12``), and its traceback points at the
page's own lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import torch

import ampclip
from ampclip import strategies

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\s*$")
MARK = re.compile(r"^<!--\s*(gpu|no-run)\s*(?::\s*(.*?))?\s*-->\s*$")
# Fence languages that would hold Python and still escape the test: a block is Python only as ```python.
PYTHON_LIKE = {"py", "python3", "pycon", "ipython", "Python"}


@dataclass
class Block:
    page: str  # relative to the repository, as a reader finds it
    line: int  # of the opening fence, 1-based
    code: str
    mark: Optional[str] = None  # "gpu" or "no-run"
    reason: str = ""

    def __str__(self):
        return f"{self.page}:{self.line}"

    def skip_reason(self) -> Optional[str]:
        if self.mark == "no-run":
            return f"{self}: not meant to run here: {self.reason}"
        if self.mark == "gpu" and not torch.cuda.is_available():
            return f"{self}: needs CUDA: {self.reason or 'a GPU-only example'}"
        return None


def parse(path: Path, root: Path = ROOT) -> list[Block]:
    """The ```python blocks of one page, each with the mark on the line before it. Raises ValueError on a
    mark that is not right before a ```python block, a mark without a reason, an unclosed fence or a
    Python-like fence language that would be silently left out."""
    page = str(path.relative_to(root))
    lines = path.read_text().splitlines()
    blocks, i, pending = [], 0, None
    while i < len(lines):
        mark = MARK.match(lines[i])
        if mark:
            if mark.group(1) == "no-run" and not mark.group(2):
                raise ValueError(f"{page}:{i + 1}: a no-run mark needs a reason: <!-- no-run: why -->")
            pending = (i + 1, mark.group(1), mark.group(2) or "")
            i += 1
            continue
        fence = FENCE.match(lines[i])
        if fence is None:
            if pending:
                raise ValueError(f"{page}:{pending[0]}: a mark must be on the line right before a ```python block")
            i += 1
            continue
        lang, start = fence.group(1), i
        if lang in PYTHON_LIKE:
            raise ValueError(f"{page}:{i + 1}: write ```python, not ```{lang}: the docs test only runs ```python")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise ValueError(f"{page}:{i + 1}: the code block is never closed")
        if pending and lang != "python":
            raise ValueError(f"{page}:{pending[0]}: a mark must be on the line right before a ```python block")
        if lang == "python":
            mark, reason = (pending[1], pending[2]) if pending else (None, "")
            blocks.append(Block(page, start + 1, "\n".join(lines[start + 1 : end]) + "\n", mark, reason))
        pending = None
        i = end + 1
    if pending:
        raise ValueError(f"{page}:{pending[0]}: a mark must be on the line right before a ```python block")
    return blocks


BLOCKS = [block for page in PAGES for block in parse(page)]


@dataclass
class PageRun:
    """One page's namespace and what of it has run, shared by the tests of that page's blocks."""

    workdir: Path
    namespace: dict = field(default_factory=lambda: {"__name__": "__main__"})  # as a script a reader runs
    done: set = field(default_factory=set)
    failed: Optional[str] = None  # the block that failed, reported by its own test


_RUNS: dict[str, PageRun] = {}


def _execute(block: Block, run: PageRun) -> None:
    # Blank lines before the code and the page's path: a traceback shows the page's own lines.
    code = compile("\n" * block.line + block.code, str(ROOT / block.page), "exec")
    exec(code, run.namespace)


def _execute_recorded(block: Block, run: PageRun) -> None:
    """Runs ``block`` in its page's run and records it there as done, or as the page's first failure."""
    try:
        _execute(block, run)
    except BaseException:
        run.failed = str(block)
        raise
    run.done.add(str(block))


@pytest.fixture(autouse=True)
def _process_state_restored():
    """What a block changes in the process (torch.nn.utils patched, a strategy registered) is undone after
    it: no other test sees it."""
    registered = dict(strategies.STRATEGIES)
    yield
    if ampclip.is_patched():
        ampclip.unpatch_torch()
    strategies.STRATEGIES.clear()
    strategies.STRATEGIES.update(registered)


def test_every_page_has_its_python_blocks_collected():
    # Fails on a stray or reasonless mark, a ```py fence or an unclosed block (parse raises), and if the
    # pages lost their examples altogether (a broken fence pattern would skip everything silently).
    assert len(BLOCKS) >= 15 and {b.page for b in BLOCKS} >= {"README.md", "docs/clipper.md", "docs/scaler.md"}
    marked = [b for b in BLOCKS if b.mark]
    assert len(marked) <= len(BLOCKS) // 4, [str(b) for b in marked]  # marked blocks stay rare


def test_parse_refuses_what_would_escape_the_test(tmp_path):
    page = tmp_path / "page.md"
    cases = {
        "<!-- gpu -->\n\n```python\nx = 1\n```\n": "right before",
        "<!-- no-run -->\n```python\nx = 1\n```\n": "needs a reason",
        "```py\nx = 1\n```\n": "not ```py",
        "```python\nx = 1\n": "never closed",
        "<!-- gpu: cuda graphs -->\n```bash\nls\n```\n": "right before",
    }
    for text, message in cases.items():
        page.write_text(text)
        with pytest.raises(ValueError, match=message):
            parse(page, tmp_path)
    page.write_text("intro\n\n<!-- gpu: cuda graphs -->\n```python\nx = 1\n```\n\n"
                    "```bash\nls\n```\n```python\ny = 2\n```\n")
    blocks = parse(page, tmp_path)
    assert [(b.line, b.mark, b.reason, b.code) for b in blocks] == [
        (4, "gpu", "cuda graphs", "x = 1\n"), (11, None, "", "y = 2\n")]


def test_a_failing_block_names_its_page_and_line(tmp_path):
    block = Block("docs/page.md", 7, "x = 1\nraise RuntimeError('broken')\n")
    with pytest.raises(RuntimeError) as info:
        _execute(block, PageRun(tmp_path))
    last = info.traceback[-1]
    assert (str(last.path), last.lineno + 1) == (str(ROOT / "docs" / "page.md"), 9)


# A GPU block is in the GPU suite too (`pytest -m gpu`, the kernels compiled); the rest of its page runs before it.
@pytest.mark.parametrize("block", [pytest.param(b, id=str(b), marks=[pytest.mark.gpu] if b.mark == "gpu" else [])
                                   for b in BLOCKS])
def test_doc_block_runs(block, tmp_path_factory, monkeypatch):
    reason = block.skip_reason()
    if reason:
        pytest.skip(reason)
    run = _RUNS.get(block.page)
    if run is None:
        run = _RUNS[block.page] = PageRun(tmp_path_factory.mktemp(Path(block.page).stem))
    monkeypatch.chdir(run.workdir)  # a page that writes files (TensorBoard logs) writes them there
    if run.failed:
        pytest.skip(f"{block}: the page's block at {run.failed} failed, and this one may build on it")
    # Earlier blocks of the page not run yet (when this block was selected alone) run first, in order.
    for earlier in [b for b in BLOCKS if b.page == block.page and b.line < block.line]:
        if str(earlier) not in run.done and not earlier.skip_reason():
            _execute_recorded(earlier, run)
    _execute_recorded(block, run)

