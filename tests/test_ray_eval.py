"""eval on Ray: the same answers and summary as a local run, and dead workers retried or reported."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TIMINGS, flat_spec, untimed

from loramem.evaluation.rundir import ANSWERS, FAILURES, read_answers
from loramem.evaluation.runner import run_eval
from loramem.specs.eval import RaySpec

ray = pytest.importorskip("ray")

FACTS = [
    ("light", "The lighthouse on Brannock Point was designed by Mara Quell.", "Who designed it?", "Mara Quell"),
    ("bees", "Ilse Varn keeps bees in Orlow and sells honey on Fridays.", "Who keeps bees?", "Ilse Varn"),
    ("flaky", "The ferry to Skellan leaves at dawn, steered by Odo Brisk.", "Who steers it?", "Odo Brisk"),
    ("doomed", "The archive of Vell holds four hundred maps drawn by Pia Lune.", "Who drew them?", "Pia Lune"),
    ("tide", "Salt from the pans of Ostra is raked by Enna Holt each August.", "Who rakes it?", "Enna Holt"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Path:
    """A local Ray instance with 2 CPUs; its workers die on their first attempt at `flaky`, always at `doomed`, run
    out of memory (an exception) on their first attempt at `tide`, and note every model load in the returned file."""
    loads = tmp_path_factory.mktemp("ray") / "loads.txt"
    env = {"LORAMEM_FAULT_DOCS": "flaky:1,doomed:99,tide:1:oom", "LORAMEM_QUIET": "1", "LORAMEM_LOAD_LOG": str(loads)}
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR", runtime_env={"env_vars": env}
    )
    yield loads
    ray.shutdown()


def dataset(folder: Path, ids: list[str]) -> Path:
    rows = [
        {
            "id": i,
            "document": doc,
            "qa": [{"question": q, "answers": [a]}, {"question": "Where?", "answers": ["x"]}],
            "train_qa": [{"question": q.replace("Who", "Whom"), "answer": a}],
        }
        for i, doc, q, a in FACTS
        if i in ids
    ]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CONFIG = flat_spec(
    ratios=[0.0, 1.0], presses=["knorm"], modes=["none", "decode"], formats=["qa"], max_new_tokens=3, steps=1, rank=2
)
# The complete run: every kind of cell, library modes included (their library is built on a worker first).
LIBRARY_CONFIG = CONFIG.replace(
    modes=["none", "decode", "routed-merge", "rag"], library={"top_k": 2, "context_chunks": 1}
)
COMPLETE = ["light", "bees", "flaky", "tide"]


def rows(run: Path) -> list[dict]:
    found = [{k: v for k, v in r.items() if k not in TIMINGS} for r in read_answers(run / ANSWERS)]
    return sorted(found, key=lambda r: json.dumps(r, sort_keys=True))


@dataclass
class Complete:
    """One Ray run that completes despite a worker dying (`flaky`) and an out-of-memory error (`tide`), a local run
    of the same grid, and the pids of the model loads the Ray run made."""

    ray: Path
    local: Path
    on_ray: dict
    summary: dict
    loads: list[str]


@pytest.fixture(scope="module")
def complete(cluster, tiny, tiny_dir, tmp_path_factory, one_thread) -> Complete:
    """Shared by the tests that check one aspect each of a complete run (each Ray actor starts in seconds)."""
    from loramem.evaluation.ray import run_eval_ray

    folder = tmp_path_factory.mktemp("complete")
    data = dataset(folder, COMPLETE)
    local = run_eval(tiny, data, folder / "local", LIBRARY_CONFIG)
    cluster.write_text("")
    on_ray = run_eval_ray(str(tiny_dir), data, folder / "ray", LIBRARY_CONFIG)
    return Complete(folder / "ray", folder / "local", on_ray, local, cluster.read_text().split())


def test_ray_run_equals_local_run(complete):
    """Answers and summary as a local run's, though one worker died (its document retried on a fresh one)."""
    assert rows(complete.ray) == rows(complete.local) and untimed(complete.on_ray) == untimed(complete.summary)
    assert complete.summary["complete"] and complete.summary["n_answers"] == len(COMPLETE) * 2 * (2 * 2 + 2)
    assert not (complete.ray / "parts" / "light.jsonl").exists()  # folded into answers.jsonl
    assert (complete.ray / "parts" / "flaky.attempts").read_text() == "2"  # died once, retried


def test_library_modes_on_ray_equal_a_local_run(complete):
    """A worker builds the run's library before the documents route over it."""
    assert complete.summary["routing"]["n"] == len(COMPLETE) * 2
    assert {r["mode"] for r in read_answers(complete.ray / ANSWERS)} == {"none", "decode", "routed-merge", "rag"}
    assert (complete.ray / "library" / "library.json").is_file()


def test_each_worker_loads_the_model_once(complete):
    """Four documents on two worker slots, one worker dying: three actors, three model loads (so actors answered
    more than one document each without reloading); an out-of-memory error is retried on its living actor, with
    no reload."""
    assert len(complete.loads) == 3 and len(set(complete.loads)) == 3
    assert (complete.ray / "parts" / "tide.attempts").read_text() == "2"


def test_dead_worker_reported_others_kept_then_resumed(cluster, tiny, tiny_dir, tmp_path, one_thread):
    from loramem.evaluation.ray import run_eval_ray

    data = dataset(tmp_path, ["light", "doomed"])
    run = tmp_path / "run"
    summary = run_eval_ray(str(tiny_dir), data, run, CONFIG, workers=RaySpec(max_retries=1))
    assert not summary["complete"] and summary["n_failed_cells"] == 8
    (failure,) = json.loads((run / FAILURES).read_text())
    assert failure["doc_id"] == "doomed" and failure["cells"] == 8 and "died" in failure["error"].lower()
    assert {r["doc_id"] for r in read_answers(run / ANSWERS)} == {"light"} and summary["n_answers"] == 8
    assert (run / "parts" / "doomed.attempts").read_text() == "2"

    resumed = run_eval(tiny, data, run, CONFIG, resume=True)  # the failed cells only, here without Ray
    assert resumed["complete"] and resumed["n_answers"] == 16 and not (run / FAILURES).exists()
    fresh = run_eval(tiny, data, tmp_path / "fresh", CONFIG)
    assert rows(run) == rows(tmp_path / "fresh") and untimed(resumed) == untimed(fresh)
