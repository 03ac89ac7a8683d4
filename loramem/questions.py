"""Questions files, parsed by one rule for every front end (the CLI today, a server later).

A file is either JSONL (its first non-blank line is a JSON object: every line then must be an object with a
"question" string) or plain lines (each non-blank line is a question, asked as written, braces and brackets
included). The format is decided once per file, never per line, so a plain question that happens to start
with `{` is not mistaken for JSON. Lines end at `\\n` only: `str.splitlines` would also split on U+2028, form
feeds and the other Unicode breaks, which are part of a question (and valid inside JSON strings).
"""

from __future__ import annotations

import json
from typing import Any

from loramem.errors import LoramemError
from loramem.fileio import text_lines


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def parse_questions(text: str, source: str = "questions") -> list[dict[str, Any]]:
    """The questions of a questions file's text: a list of records, each with a "question" string (JSONL
    records keep their other fields)."""
    numbered = [(number, line.strip()) for number, line in enumerate(text_lines(text), 1) if line.strip()]
    if not numbered or not _is_object(numbered[0][1]):
        return [{"question": line} for _, line in numbered]
    items = []
    for number, line in numbered:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LoramemError(f"{source} line {number}: invalid JSON ({exc.msg}); the file is JSONL") from exc
        if not isinstance(record, dict) or not isinstance(record.get("question"), str):
            raise LoramemError(f"{source} line {number}: expected an object with a 'question' string")
        items.append(record)
    return items
