"""Questions files: one format per file, lines split at `\\n` only (`loramem.questions.parse_questions`)."""

from __future__ import annotations

import pytest

from loramem.errors import LoramemError
from loramem.questions import parse_questions


def test_unicode_line_breaks_stay_inside_a_question():
    text = "Who kept\u2028the tower?\r\nWhere\x0cis it?\n"
    assert parse_questions(text) == [{"question": "Who kept\u2028the tower?"}, {"question": "Where\x0cis it?"}]


def test_plain_lines_are_asked_as_written_whatever_they_start_with():
    text = '{braces} in a question?\nWho?\n["Who?"]\n{"question": "Where?"}\n'
    assert [q["question"] for q in parse_questions(text)] == [line for line in text.splitlines()]


def test_a_file_starting_with_an_object_is_jsonl_throughout():
    text = '\n{"question": "Who?", "id": 1}\n{"question": "Where\\u2028now?"}\n'
    assert parse_questions(text) == [{"question": "Who?", "id": 1}, {"question": "Where\u2028now?"}]
    with pytest.raises(LoramemError, match="line 2: expected an object"):
        parse_questions('{"question": "Who?"}\n["Who?"]\n')
    with pytest.raises(LoramemError, match="line 2: invalid JSON"):
        parse_questions('{"question": "Who?"}\nWhere?\n')
