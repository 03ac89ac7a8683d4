"""The dataset format, its validation, the converters and the train/held-out split."""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import pytest

from loramem.data.formats import (
    QA,
    DocRecord,
    TrainQA,
    convert_longhealth,
    convert_narrativeqa,
    convert_narrativeqa_json,
    convert_squad,
    detokenize,
    load_dataset,
    train_split,
    write_dataset,
)
from loramem.errors import LoramemError

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(os.environ.get("LORAMEM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _shared(relative: str) -> Path:
    """A file of the offline benchmark copies; the test is skipped where they are absent (CI)."""
    path = SHARED / relative
    if not path.is_file():
        pytest.skip(f"shared data not found: {path} (set LORAMEM_SHARED_DATA)")
    return path


def _write_lines(path: Path, *lines: object) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD = {"id": "a", "document": "Some text.", "qa": [{"question": "Q?", "answers": ["A"]}]}


# --- format ------------------------------------------------------------------------------------------


def test_load_fixture_resolves_document_path_relative_to_the_file() -> None:
    records = load_dataset(FIXTURES / "dataset.jsonl")
    assert [r.id for r in records] == ["inline", "from-file"]
    assert records[0].train_qa == [TrainQA("Which city is Ostrava Minor's capital?", "Pella")]
    assert records[1].document.startswith("The beacon on Skarn Head")
    assert records[1].qa == [QA("Who first lit the Skarn Head beacon?", ["Edda Mol", "keeper Edda Mol"])]
    assert records[1].train_qa == []


def test_write_then_load_round_trips_and_leaves_no_temp_file(tmp_path: Path) -> None:
    records = [
        DocRecord("x", "Ünïcode text — kept as is.", [QA("Q?", ["a", "b"])], [TrainQA("T?", "t")]),
        DocRecord("y", "Other.", [QA("R?", ["c"])]),
    ]
    target = tmp_path / "out.jsonl"
    write_dataset(records, target)
    assert load_dataset(target) == records
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    assert "train_qa" not in target.read_text(encoding="utf-8").splitlines()[1]


def test_write_dash_goes_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset([DocRecord("x", "Text.", [QA("Q?", ["A"])])], "-")
    assert json.loads(capsys.readouterr().out) == {
        "id": "x",
        "document": "Text.",
        "qa": [{"question": "Q?", "answers": ["A"]}],
    }


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ({**GOOD, "qas": []}, "unknown field(s) qas"),
        ({**GOOD, "document_path": "x.txt"}, "exactly one of `document` and `document_path`"),
        ({"id": "a", "qa": []}, "exactly one of `document` and `document_path`"),
        ({**GOOD, "id": ""}, "`id` must be a non-empty string"),
        ({**GOOD, "qa": {"question": "Q?"}}, "`qa` must be a list"),
        ({**GOOD, "qa": [{"question": "Q?", "answers": []}]}, "qa[0]: `answers` must be a non-empty list"),
        ({**GOOD, "qa": [{"question": "Q?", "answers": "A"}]}, "`answers` must be a list"),
        ({**GOOD, "qa": [{"question": "Q?"}]}, 'qa[0]: expected {"question": str, "answers": [str, ...]}'),
        ({**GOOD, "train_qa": [{"question": "T?", "answers": ["t"]}]}, 'train_qa[0]: expected {"question": str'),
        ({**GOOD, "train_qa": [{"question": " q? ", "answer": "A"}]}, "is also a held-out question"),
        ({**GOOD, "document": "  "}, "`document` must be a non-empty string"),
        ({"id": "b", "document_path": "missing.txt", "qa": []}, "not found"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, line: object, message: str) -> None:
    path = _write_lines(tmp_path / "data.jsonl", GOOD | {"id": "first"}, "", line)
    with pytest.raises(LoramemError) as info:
        load_dataset(path)
    assert f"{path}:3" in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize("where", ["../outside.txt", "{outside}", "link.txt", "sub/../../outside.txt"])
def test_document_path_stays_inside_the_datasets_folder(tmp_path: Path, where: str) -> None:
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    outside = tmp_path / "outside.txt"
    outside.write_text("A secret.")
    (folder / "link.txt").symlink_to(outside)
    where = where.format(outside=outside)
    path = _write_lines(folder / "data.jsonl", {**GOOD, "document": None} | {"document_path": where})
    path.write_text(path.read_text().replace('"document": null, ', ""))
    with pytest.raises(LoramemError, match=f"document_path '{re.escape(where)}' leads outside the dataset's folder"):
        load_dataset(path)
    assert load_dataset(path, allow_outside=True)[0].document == "A secret."


def test_duplicate_ids_and_empty_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(LoramemError, match="duplicate id 'a' \\(first on line 1\\)"):
        load_dataset(_write_lines(tmp_path / "dup.jsonl", GOOD, GOOD))
    with pytest.raises(LoramemError, match="holds no documents"):
        load_dataset(_write_lines(tmp_path / "empty.jsonl", ""))
    with pytest.raises(LoramemError, match="not found"):
        load_dataset(tmp_path / "absent.jsonl")


# --- detokenization ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "text"),
    [
        ("at her parents ' house", "at her parents' house"),
        ("Bill Slater ) said", "Bill Slater) said"),
        ("Hal ( born 1901 ) left", "Hal (born 1901) left"),
        ("one , two ; three : four . Five ? Six !", "one, two; three: four. Five? Six!"),
        ("he does n't know ; CA N'T", "he doesn't know; CAN'T"),
        ("Narcissus s spring", "Narcissus's spring"),
        ("They re here and I ll go , you d see", "They're here and I'll go, you'd see"),
        ("it 's his", "it's his"),
        ("he said `` go home '' and \" stay here \" .", 'he said "go home" and "stay here".'),
        ("costs $ 300,000 or £ 5", "costs $300,000 or £5"),
        ("I 'm gon na wait ...", "I'm gonna wait..."),
        ("a run -- then rest – done", "a run -- then rest – done"),
        (
            "former\u00e2\u0080\u0099s \u00c2\u0141 25 fianc\u0102\u0160e 35,000\u00c2 BC",
            "former’s £25 fiancée 35,000 BC",
        ),
        ("Thénardier meets Ōshima in Ryūji s house", "Thénardier meets Ōshima in Ryūji's house"),
    ],
)
def test_detokenize(tokens: str, text: str) -> None:
    assert detokenize(tokens) == text


# --- converters --------------------------------------------------------------------------------------


def test_narrativeqa_repository_layout() -> None:
    records = convert_narrativeqa(FIXTURES / "narrativeqa")
    assert [len(r.qa) for r in records] == [2, 3, 1]
    first = records[0]
    assert first.id == "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567"
    assert first.document.startswith('Orrin Vale, a lighthouse keeper on the island of Tarsk, finds a "message')
    assert "\nHe sails" in first.document
    assert first.qa[0] == QA("Where does Orrin Vale keep the lighthouse?", ["Tarsk", "On the island of Tarsk."])
    assert first.qa[1].answers == ["Ida Crane"]

    valid = convert_narrativeqa(FIXTURES / "narrativeqa", split="valid")
    assert [r.id for r in valid] == ["1b2c3d4e5f60718293a4b5c6d7e8f90123456789"]
    assert valid[0].qa[0] == QA(
        "What does Mara inherit?", ["Her grandfather's clock shop", "a clock shop, in Brennick"]
    )

    summaries = FIXTURES / "narrativeqa" / "third_party" / "wikipedia" / "summaries.csv"
    assert convert_narrativeqa(FIXTURES / "narrativeqa" / "qaps.csv", "test", summaries=summaries)[0].qa == [
        QA("How many passengers are saved?", ["40", "All 40 of them"])
    ]


def test_narrativeqa_repository_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(LoramemError, match="unknown NarrativeQA split 'dev'"):
        convert_narrativeqa(FIXTURES / "narrativeqa", split="dev")
    with pytest.raises(LoramemError, match=r"summaries\.csv as well"):
        convert_narrativeqa(FIXTURES / "narrativeqa" / "qaps.csv")
    with pytest.raises(LoramemError, match="CSV file not found"):
        convert_narrativeqa(tmp_path)
    (tmp_path / "qaps.csv").write_text("document_id,question\nx,Why?\n")
    summaries = FIXTURES / "narrativeqa" / "third_party" / "wikipedia" / "summaries.csv"
    with pytest.raises(LoramemError, match="missing column\\(s\\) answer1, answer2, set"):
        convert_narrativeqa(tmp_path, summaries=summaries)


EXPECTED_TOBIN = (
    "Tobin Reyes (born in Vask) returns to his parents' house after the war. He doesn't recognise the town, "
    "and his sister Lena's letters, kept in a tin, are all that remain. Lena tells him, \"We can't stay here.\" "
    "They're gone by spring, taking $300 and the dog; Tobin's car stays behind."
)


@pytest.mark.parametrize("zipped", [False, True])
def test_narrativeqa_tokenized_json(tmp_path: Path, zipped: bool) -> None:
    path = FIXTURES / "narrativeqa_dev.json"
    if zipped:
        path = tmp_path / "dev.json.zip"
        with zipfile.ZipFile(path, "w") as archive:
            archive.write(FIXTURES / "narrativeqa_dev.json", "dev.json")
    records = convert_narrativeqa_json(path)
    assert [r.id for r in records] == ["d0c1", "d0c2"]
    assert records[0].document == EXPECTED_TOBIN
    assert records[0].qa == [
        QA("Where was Tobin born?", ["In Vask", "Vask"]),
        QA("Whose letters are kept in a tin?", ["Lena's letters", "His sister Lena's"]),
        QA("How much money do they take?", ["$300", "300 dollars"]),
    ]
    assert records[1].qa == [QA("WHO IS THE CAPTAIN OF THE MARIGOLD?", ["Hessa Lund"])]


def test_longhealth() -> None:
    records = convert_longhealth(FIXTURES / "longhealth_benchmark_v5.json")
    assert [r.id for r in records] == ["patient_01", "patient_02"]
    assert records[0].document.startswith("Discharge letter\nPatient: Anna Velde")
    assert "\n\nFollow-up visit 01/2020" in records[0].document
    assert records[0].qa == [
        QA("Which therapy did Mrs. Velde receive?", ["R-CHOP"]),
        QA("What did the CT in 01/2020 show?", ["Partial remission"]),
    ]
    assert records[1].qa == [QA("When was the stent placed?", ["02/2021"])]


def test_squad(tmp_path: Path) -> None:
    records = convert_squad(FIXTURES / "squad_dev.json")
    assert [r.id for r in records] == ["Vell_Bridge-0", "Vell_Bridge-1"]
    assert records[0].document.startswith("The Vell Bridge was opened in 1902")
    assert records[0].qa == [
        QA("When was the Vell Bridge opened?", ["1902", "in 1902"]),
        QA("Who designed the Vell Bridge?", ["Karla Wend"]),
    ]
    assert records[1].qa == [QA("When does the Omst flood?", ["every spring", "spring"])]


def test_converters_reject_other_layouts(tmp_path: Path) -> None:
    with pytest.raises(LoramemError, match=r"is not in the SQuAD v1\.1 JSON"):
        convert_squad(FIXTURES / "longhealth_benchmark_v5.json")
    with pytest.raises(LoramemError, match="is not in the LongHealth benchmark JSON"):
        convert_longhealth(FIXTURES / "squad_dev.json")
    with pytest.raises(LoramemError, match="is not in the NarrativeQA tokenized JSON"):
        convert_narrativeqa_json(FIXTURES / "squad_dev.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LoramemError, match="is not valid JSON"):
        convert_squad(tmp_path / "bad.json")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(LoramemError, match="not a valid zip archive"):
        convert_squad(tmp_path / "bad.zip")


# --- train/held-out split ------------------------------------------------------------------------------


def _doc(doc_id: str, n: int) -> DocRecord:
    return DocRecord(doc_id, "Text.", [QA(f"Question {i}?", [f"answer {i}", "other"]) for i in range(n)])


def test_train_split_moves_a_fraction_without_overlap() -> None:
    records = [_doc("a", 10), _doc("b", 3), _doc("c", 1)]
    split = train_split(records, 0.5, seed=7)
    assert [(len(r.train_qa), len(r.qa)) for r in split] == [(5, 5), (2, 1), (0, 1)]
    for before, after in zip(records, split, strict=True):
        held_out = {q.question for q in after.qa}
        assert held_out.isdisjoint(t.question for t in after.train_qa)
        assert held_out | {t.question for t in after.train_qa} == {q.question for q in before.qa}
        assert all(t.answer == t.question.replace("Question", "answer").rstrip("?") for t in after.train_qa)
    assert records[0].train_qa == []  # the input is left alone


def test_train_split_is_deterministic_and_independent_of_order() -> None:
    records = [_doc(f"d{i}", 12) for i in range(5)]
    assert train_split(records, 0.4, seed=1) == train_split(records, 0.4, seed=1)
    assert train_split(records[::-1], 0.4, seed=1) == train_split(records, 0.4, seed=1)[::-1]
    assert train_split(records, 0.4, seed=1) != train_split(records, 0.4, seed=2)
    assert train_split(records, 0.0, seed=1) == records
    assert all(len(r.qa) == 1 for r in train_split(records, 0.99, seed=1))


def test_train_split_moves_repeated_questions_together() -> None:
    record = DocRecord("r", "Text.", [QA("Who?", ["x"]), QA("who? ", ["y"]), QA("Why?", ["z"])])
    for seed in range(10):
        (split,) = train_split([record], 0.5, seed)
        assert {q.question.strip().lower() for q in split.qa}.isdisjoint(t.question.lower() for t in split.train_qa)
        assert len(split.qa) + len(split.train_qa) in (2, 3)


def test_train_split_fraction_must_be_below_one() -> None:
    with pytest.raises(LoramemError, match="training fraction"):
        train_split([_doc("a", 3)], 1.0, seed=0)


# --- the real offline copies (skipped where absent) -------------------------------------------------


def test_real_narrativeqa_dev_converts_without_loss() -> None:
    path = _shared("narrativeqa/dev.json.zip")
    records = convert_narrativeqa_json(path)
    assert len(records) == 115
    assert sum(len(r.qa) for r in records) == 3461
    raw = json.loads(zipfile.ZipFile(path).read("dev.json"))
    assert {r.id for r in records} == {item["_id"] for item in raw}
    for record in records:
        for bad in (" ,", " .", "( ", " )", " n't", " '", "â\x80", "ÂŁ"):
            assert bad not in record.document, (record.id, bad)
        assert all(q.question and q.answers for q in record.qa)
    split = train_split(records, 0.5, seed=0)
    assert sum(len(r.qa) + len(r.train_qa) for r in split) <= 3461


def test_real_squad_dev_converts_without_loss() -> None:
    records = convert_squad(_shared("squad/dev-v1.1.json.zip"))
    assert len(records) == 2067
    assert sum(len(r.qa) for r in records) == 10570
    assert len({r.id for r in records}) == 2067
    assert all(a in r.document for r in records for q in r.qa for a in q.answers)
