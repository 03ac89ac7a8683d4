"""Document-QA datasets: one JSONL format for every benchmark, plus converters into it.

Format: one JSON object per line (blank lines are skipped), one document each:

    {"id": "doc-1",
     "document": "The full text ...",            # or "document_path": "docs/doc-1.txt"
     "qa": [{"question": "Who ...?", "answers": ["ref 1", "ref 2"]}],
     "train_qa": [{"question": "Which ...?", "answer": "..."}]}   # optional

`id` is unique in the file. Exactly one of `document` (the text) and `document_path` (a UTF-8 file,
resolved relative to the JSONL file and inside its folder) is given. `qa` holds the held-out questions, each with one or
more reference answers; `train_qa` holds question-answer pairs an adapter may be trained on, and no
training question may repeat a held-out one. Unknown fields are refused so that a typo does not
silently drop data.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loramem.data import SEED
from loramem.errors import LoramemError
from loramem.fileio import read_input_bytes, read_text, text_lines, write_output
from loramem.vocab import NARRATIVEQA_SPLITS

PathLike = str | Path

_FIELDS = {"id", "document", "document_path", "qa", "train_qa"}


@dataclass
class QA:
    """A held-out question; any of `answers` counts as correct."""

    question: str
    answers: list[str]


@dataclass
class TrainQA:
    """A question-answer pair an adapter may be trained on."""

    question: str
    answer: str


@dataclass
class DocRecord:
    """One document with its held-out questions and optional training pairs."""

    id: str
    document: str
    qa: list[QA]
    train_qa: list[TrainQA] = field(default_factory=list)


# --- the JSONL format ---------------------------------------------------------------------------


def _jsonl_objects(data: bytes, source: str) -> Iterator[tuple[str, int, object]]:
    """(where, line number, parsed JSON) per non-blank line of JSONL bytes."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LoramemError(f"{source} is not UTF-8 text") from exc
    for lineno, line in enumerate(text_lines(text), 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            yield where, lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise LoramemError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc


def load_dataset(path: PathLike, *, allow_outside: bool = False) -> list[DocRecord]:
    """Read and validate a dataset JSONL file ('-' for stdin); errors name the file and line. A `document_path`
    must lead to a file inside the dataset's folder (links resolved) unless `allow_outside`: a dataset from
    elsewhere must not read, and then hand to a model or a report, any file its user can read."""
    base = Path.cwd() if str(path) == "-" else Path(path).parent
    records: list[DocRecord] = []
    first_line: dict[str, int] = {}
    for where, lineno, obj in _jsonl_objects(*read_input_bytes(path, "dataset")):
        record = _parse_record(obj, where, base, allow_outside)
        if record.id in first_line:
            raise LoramemError(f"{where}: duplicate id {record.id!r} (first on line {first_line[record.id]})")
        first_line[record.id] = lineno
        records.append(record)
    if not records:
        raise LoramemError(f"{path} holds no documents")
    return records


def write_dataset(records: Iterable[DocRecord], path: PathLike) -> None:
    """Write records as JSONL atomically (temp file + rename), or to stdout for '-'."""
    lines = [json.dumps(_record_json(r), ensure_ascii=False) + "\n" for r in records]
    write_output(str(path), "".join(lines).encode("utf-8"), "dataset")


def load_qa_pairs(path: PathLike) -> tuple[list[TrainQA], str]:
    """Adapter supervision from a JSONL file of {"question", "answer"} lines, and the file's sha256."""
    data, source = read_input_bytes(path, "QA file")
    pairs = []
    for where, _, obj in _jsonl_objects(data, source):
        if not isinstance(obj, dict):
            raise LoramemError(f'{where}: expected {{"question": str, "answer": str}}')
        pairs.append(TrainQA(_string(obj, "question", where), _string(obj, "answer", where)))
    if not pairs:
        raise LoramemError(f"{path} holds no question-answer pairs")
    return pairs, hashlib.sha256(data).hexdigest()


def _record_json(record: DocRecord) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": record.id, "document": record.document, "qa": [asdict(q) for q in record.qa]}
    if record.train_qa:
        obj["train_qa"] = [asdict(t) for t in record.train_qa]
    return obj


def _parse_record(obj: object, where: str, base: Path, allow_outside: bool = False) -> DocRecord:
    if not isinstance(obj, dict):
        raise LoramemError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise LoramemError(f"{where}: unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(_FIELDS))}")
    doc_id = _string(obj, "id", where)
    if ("document" in obj) == ("document_path" in obj):
        raise LoramemError(f"{where}: give exactly one of `document` and `document_path`")
    if "document" in obj:
        document = _string(obj, "document", where)
    else:
        relative = _string(obj, "document_path", where)
        if not allow_outside and not (base / relative).resolve().is_relative_to(base.resolve()):
            raise LoramemError(f"{where}: document_path {relative!r} leads outside the dataset's folder {base}")
        document = read_text(base / relative, f"document_path of {where}")
    qa = [_parse_qa(item, f"{where}: qa[{i}]") for i, item in enumerate(_list(obj, "qa", where))]
    if not qa:
        raise LoramemError(f"{where}: `qa` is empty; every document needs at least one held-out question")
    train_qa = [
        _parse_train_qa(item, f"{where}: train_qa[{i}]")
        for i, item in enumerate(_list(obj, "train_qa", where) if "train_qa" in obj else [])
    ]
    held_out = {_question_key(q.question) for q in qa}
    for t in train_qa:
        if _question_key(t.question) in held_out:
            raise LoramemError(f"{where}: training question {t.question!r} is also a held-out question")
    return DocRecord(doc_id, document, qa, train_qa)


def _parse_qa(item: object, where: str) -> QA:
    if not isinstance(item, dict) or set(item) != {"question", "answers"}:
        raise LoramemError(f'{where}: expected {{"question": str, "answers": [str, ...]}}')
    answers = _list(item, "answers", where)
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise LoramemError(f"{where}: `answers` must be a non-empty list of non-empty strings")
    return QA(_string(item, "question", where), answers)


def _parse_train_qa(item: object, where: str) -> TrainQA:
    if not isinstance(item, dict) or set(item) != {"question", "answer"}:
        raise LoramemError(f'{where}: expected {{"question": str, "answer": str}}')
    return TrainQA(_string(item, "question", where), _string(item, "answer", where))


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise LoramemError(f"{where}: `{key}` must be a non-empty string")
    return value


def _list(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise LoramemError(f"{where}: `{key}` must be a list")
    return value


def _question_key(question: str) -> str:
    """Questions that differ only in case or spacing are the same question (for leak checks)."""
    return " ".join(question.lower().split())


def _dedupe(texts: Iterable[str]) -> list[str]:
    """Stripped, non-empty, first occurrence kept: references often repeat across annotators."""
    return list(dict.fromkeys(t.strip() for t in texts if t.strip()))


# --- splitting held-out questions into training pairs ----------------------------------------------


def train_split(records: Sequence[DocRecord], fraction: float, seed: int = SEED) -> list[DocRecord]:
    """Move about `fraction` of each document's distinct questions into `train_qa`.

    Repeated questions (same text up to case and spacing) move together, so no held-out question
    is also trained on; at least one question per document stays held out. The choice depends only
    on the seed and the document id, not on the order of the records.
    """
    if not 0 <= fraction < 1:
        raise LoramemError(f"the training fraction must be at least 0 and below 1, not {fraction}")
    split = []
    for record in records:
        groups: dict[str, list[QA]] = {}
        for qa in record.qa:
            groups.setdefault(_question_key(qa.question), []).append(qa)
        n_train = max(0, min(round(fraction * len(groups)), len(groups) - 1))
        chosen = set(random.Random(f"{seed}:{record.id}").sample(sorted(groups), n_train))
        moved = [TrainQA(g[0].question, g[0].answers[0]) for key, g in groups.items() if key in chosen]
        kept = [qa for qa in record.qa if _question_key(qa.question) not in chosen]
        split.append(replace(record, qa=kept, train_qa=[*record.train_qa, *moved]))
    return split


# --- converters --------------------------------------------------------------------------------------


def convert_narrativeqa(path: PathLike, split: str | None = None, summaries: PathLike | None = None) -> list[DocRecord]:
    """NarrativeQA from the official repository (summary setting), optionally one split.

    `path` is the repository folder (qaps.csv and third_party/wikipedia/summaries.csv), or qaps.csv
    itself with `summaries` naming summaries.csv. The untokenized columns are used.
    """
    if split is not None and split not in NARRATIVEQA_SPLITS:
        raise LoramemError(f"unknown NarrativeQA split {split!r}; choose one of {', '.join(NARRATIVEQA_SPLITS)}")
    root = Path(path)
    if root.is_dir():
        qaps = root / "qaps.csv"
        summaries_path = Path(summaries) if summaries else root / "third_party" / "wikipedia" / "summaries.csv"
    elif summaries is None:
        raise LoramemError(f"{path} is a file: give the NarrativeQA folder, or summaries.csv as well")
    else:
        qaps, summaries_path = root, Path(summaries)

    texts: dict[str, str] = {}
    for _, row in _csv_rows(summaries_path, {"document_id", "set", "summary"}):
        if split is None or row["set"] == split:
            texts[row["document_id"]] = row["summary"].strip()
    questions: dict[str, list[QA]] = {}
    for where, row in _csv_rows(qaps, {"document_id", "set", "question", "answer1", "answer2"}):
        if split is not None and row["set"] != split:
            continue
        if row["document_id"] not in texts:
            raise LoramemError(f"{where}: document {row['document_id']} has no summary in {summaries_path}")
        answers = _dedupe([row["answer1"], row["answer2"]])
        if not row["question"].strip() or not answers:
            raise LoramemError(f"{where}: empty question or answers")
        questions.setdefault(row["document_id"], []).append(QA(row["question"].strip(), answers))
    return [DocRecord(doc_id, text, questions[doc_id]) for doc_id, text in texts.items() if doc_id in questions]


def convert_narrativeqa_json(path: PathLike) -> list[DocRecord]:
    """NarrativeQA in the tokenized JSON layout (a list of per-question records, .json or .zip).

    Records sharing an `_id` become one document; all text is detokenized, and the extracted-span
    `answers` field is ignored in favour of the human `ground_truths`.
    """
    data = _read_json(path)
    contexts: dict[str, str] = {}
    questions: dict[str, list[QA]] = {}
    with _layout(path, "NarrativeQA tokenized JSON (a list of records with _id, context.tokens, ...)"):
        if not isinstance(data, list):
            raise TypeError("the top level is not a list")
        for i, item in enumerate(data):
            doc_id = item["_id"]
            if contexts.setdefault(doc_id, item["context.tokens"]) != item["context.tokens"]:
                raise ValueError(f"record {i}: document {doc_id} appears with two different texts")
            question = detokenize(item["question.tokens"])
            answers = _dedupe(detokenize(a) for a in item["ground_truths"])
            if not question or not answers:
                raise ValueError(f"record {i} has an empty question or no answers")
            questions.setdefault(doc_id, []).append(QA(question, answers))
    return [DocRecord(doc_id, detokenize(context), questions[doc_id]) for doc_id, context in contexts.items()]


def convert_longhealth(path: PathLike) -> list[DocRecord]:
    """LongHealth (benchmark_v5.json): one document per patient, its texts joined in order.

    The multiple-choice questions become open questions whose reference is the correct option.
    """
    data = _read_json(path)
    records = []
    with _layout(path, "LongHealth benchmark JSON (patient id -> texts, questions)"):
        for patient_id, patient in data.items():
            qa = []
            for question in patient["questions"]:
                options = [question[f"answer_{letter}"] for letter in "abcde"]
                if question["correct"] not in options:
                    raise ValueError(f"{patient_id}: the correct answer of {question['question']!r} is not an option")
                qa.append(QA(question["question"].strip(), [question["correct"].strip()]))
            document = "\n\n".join(text.strip() for text in patient["texts"].values())
            records.append(DocRecord(patient_id, document, qa))
    return records


def convert_squad(path: PathLike) -> list[DocRecord]:
    """SQuAD v1.1 (.json or .zip): one document per paragraph, id `{title}-{index}`."""
    data = _read_json(path)
    records = []
    with _layout(path, "SQuAD v1.1 JSON (data -> paragraphs -> qas)"):
        for article in data["data"]:
            for i, paragraph in enumerate(article["paragraphs"]):
                qa = []
                for q in paragraph["qas"]:
                    answers = _dedupe(a["text"] for a in q["answers"])
                    if not answers:
                        raise ValueError(f"question {q['id']} has no answer (SQuAD 2.0 is not supported)")
                    qa.append(QA(q["question"].strip(), answers))
                if qa:
                    records.append(DocRecord(f"{article['title']}-{i}", paragraph["context"], qa))
    return records


def _read_json(path: PathLike) -> Any:
    """A JSON file, or the single .json file inside a .zip archive."""
    data, source = read_input_bytes(path, "JSON file")
    if str(path).endswith(".zip"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                members = [n for n in archive.namelist() if n.endswith(".json") and "__MACOSX" not in n]
                if len(members) != 1:
                    raise LoramemError(f"{source}: expected one .json file in the archive, found {len(members)}")
                data = archive.read(members[0])
        except zipfile.BadZipFile as exc:
            raise LoramemError(f"{source} is not a valid zip archive") from exc
    try:
        return json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoramemError(f"{source} is not valid JSON: {exc}") from exc


def _csv_rows(path: Path, columns: set[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """Rows of a CSV file with the required columns, each with its `file:line` for messages."""
    if not path.is_file():
        raise LoramemError(f"CSV file not found: {path}")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = columns - set(reader.fieldnames or [])
        if missing:
            raise LoramemError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for row in reader:
            yield f"{path}:{reader.line_num}", row


@contextmanager
def _layout(path: PathLike, layout: str) -> Iterator[None]:
    """Turn a structural surprise in converter input into one actionable line."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise LoramemError(f"{path} is not in the {layout} layout: {detail}") from exc


# --- detokenization ------------------------------------------------------------------------------

_ATTACH_LEFT = frozenset({",", ".", ";", ":", "!", "?", ")", "]", "}", "%", "...", "'", "”", "’"})
_ATTACH_RIGHT = frozenset({"(", "[", "{", "$", "£", "€", "#", "“", "‘"})
_CLITICS = frozenset({"'s", "'re", "'ll", "'ve", "'d", "'m", "n't"})
# Clitics whose apostrophe the NarrativeQA preprocessing dropped: "Pete s house", "They re", "I ll".
_BARE_CLITICS = frozenset({"s", "re", "ll", "ve", "d", "m"})
_SPLIT_WORDS = frozenset({("gon", "na"), ("wan", "na"), ("got", "ta")})
# UTF-8 read as Latin-1, Windows-1252 or Latin-2 ("â\x80\x99" for "’", "ÂŁ" for "£", "Ă©" for "é").
_MOJIBAKE = re.compile("[\u00c0-\u02ff][\u0080-\u02ff]+")
_MOJIBAKE_NBSP = re.compile("Â(?=\\s)")


def detokenize(text: str) -> str:
    """Undo whitespace tokenization ("parents ' house" -> "parents' house", "( born" -> "(born")."""
    pieces: list[str] = []
    glue_next = False
    double_open = False
    for token in _repair_mojibake(text).split():
        previous = pieces[-1] if pieces else ""
        attach = glue_next
        glue_next = False
        if token in ('"', "``", "''"):
            opening = token == "``" or (token == '"' and not double_open)
            double_open = opening
            token = '"'
            attach = attach or not opening
            glue_next = opening
        elif token in _ATTACH_LEFT or token.lower() in _CLITICS:
            attach = True
        elif token.lower() in _BARE_CLITICS and previous[-1:].isalpha():
            token, attach = "'" + token, True
        elif (previous.lower(), token.lower()) in _SPLIT_WORDS:
            attach = True
        elif token in _ATTACH_RIGHT:
            glue_next = True
        if attach and pieces:
            pieces[-1] += token
        else:
            pieces.append(token)
    return " ".join(pieces)


def _repair_mojibake(text: str) -> str:
    def fix(match: re.Match[str]) -> str:
        for codec in ("latin-1", "cp1252", "iso-8859-2"):
            try:
                return match.group().encode(codec).decode("utf-8")
            except UnicodeError:
                continue
        return match.group()

    return _MOJIBAKE.sub(fix, _MOJIBAKE_NBSP.sub("", text))
