"""The Markdown tables in docs/ and the README render: a table whose rows disagree with its header on the number of
columns is shown by GitHub as plain text, and several docs tables are edited by hand next to generated ones."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
SEPARATOR = re.compile(r"^\|\s*:?-{3,}")


def column_count(line: str) -> int:
    return len(re.split(r"(?<!\\)\|", line.strip().strip("|")))


def misshapen_rows(text: str) -> list[tuple[int, int, int]]:
    """(line number, columns, header's columns) of every table row or separator that disagrees with its header."""
    lines = text.split("\n")
    found = []
    for i, line in enumerate(lines):
        if i == 0 or not SEPARATOR.match(line):
            continue
        header = column_count(lines[i - 1])
        j = i
        while j < len(lines) and lines[j].startswith("|"):
            if column_count(lines[j]) != header:
                found.append((j + 1, column_count(lines[j]), header))
            j += 1
    return found


def test_a_separator_short_of_a_column_is_found():
    table = "| a | b | c |\n|---|---|\n| 1 | 2 | 3 |\n"
    assert misshapen_rows(table) == [(2, 2, 3)]


def test_escaped_pipes_do_not_count_as_columns():
    table = "| a | b |\n|---|---|\n| x \\| y | 2 |\n"
    assert misshapen_rows(table) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_table_row_has_its_headers_columns(path):
    assert misshapen_rows(path.read_text()) == []
