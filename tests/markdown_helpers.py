"""Reading Markdown's structure in tests: which lines are prose and which are code, which
punctuation is escaped, and whether every table row keeps its columns (CommonMark and GitHub's
tables, as far as the reports use them)."""

from __future__ import annotations

import re

_FENCE = re.compile(r"^ {0,3}(`{3,})")
#: A line that is an ATX heading.
HEADING = re.compile(r"^ {0,3}#{1,6}(?: |$)")
# Characters with a Markdown meaning, unescaped: preceded by an even number of backslashes.
_UNESCAPED = r"(?<!\\)(?:\\\\)*{}"


def markdown_blocks(markdown: str) -> tuple[list[str], list[str]]:
    """The lines of ``markdown`` outside fenced code blocks, and the text of each block.

    A backtick fence closes only on a line of backticks at least as long as it (CommonMark)."""
    prose: list[str] = []
    blocks: list[str] = []
    body: list[str] = []
    fence = ""
    for line in markdown.splitlines():
        match = _FENCE.match(line)
        if not fence:
            if match:
                fence, body = match.group(1), []
            else:
                prose.append(line)
        elif match and line.strip() == match.group(1) and len(match.group(1)) >= len(fence):
            blocks.append("\n".join(body))
            fence = ""
        else:
            body.append(line)
    assert not fence, "a code block is left open"
    return prose, blocks


def unescaped(char: str, text: str) -> int:
    """How many times ``char`` occurs in ``text`` without a backslash that makes it literal."""
    return len(re.findall(_UNESCAPED.format(re.escape(char)), text))


def assert_tables_keep_their_columns(prose: list[str]) -> None:
    """That every row of each table (a run of lines starting with ``|``) has as many cells as
    its first: an unescaped ``|`` in a cell's text would add one."""
    __tracebackhide__ = True
    columns = None
    for line in prose:
        if not line.startswith("|"):
            columns = None
            continue
        cells = unescaped("|", line) - 1
        if columns is None:
            columns = cells
        assert cells == columns, f"a row with {cells} cells in a table of {columns}: {line}"
