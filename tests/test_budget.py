"""eval --budget-bytes: a byte budget split between kept KV tokens and adapter rank, on the tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import flat_spec
from test_evaluate import FAST, dataset  # noqa: F401 - the shared three-document dataset fixture

from loramem.adapters.attach import adapter_tensor_bytes
from loramem.adapters.train import adapter_element_bytes, lora_parameters, train_adapter
from loramem.errors import LoramemError
from loramem.evaluation.config import budget_points, budget_sizes, file_name
from loramem.evaluation.rundir import (
    ANSWERS,
    BUDGET_PLOT,
    BUDGET_PLOT_CONTAINS,
    CURVES,
    SUMMARY,
    cell_key,
    read_answers,
)
from loramem.evaluation.runner import run_eval
from loramem.kv.compress import compress, within_budget
from loramem.kv.encode import encode
from loramem.kv.quantize import make_storage
from loramem.specs import TrainSpec

pytestmark = pytest.mark.usefixtures("one_thread")
BUDGETS, RANKS = [40_000, 60_000], [0, 2, 4, 8]


@pytest.mark.parametrize("targets,layers,rank", [("all", None, 4), ("attn", "1", 2), ("q_proj,down_proj", None, 3)])
def test_lora_parameters_match_what_peft_trains(tiny, doc_text, tmp_path, targets, layers, rank):
    config = TrainSpec(rank=rank, targets=targets, layers=layers, steps=1, batch_size=1)
    out = tmp_path / "a.lora"
    summary = train_adapter(tiny, doc_text, [("Who?", "Orla Quenby")], out, config)
    assert lora_parameters(tiny.model, config) == summary["trainable_parameters"]
    assert adapter_tensor_bytes(out) == summary["trainable_parameters"] * adapter_element_bytes(tiny.model)


@pytest.mark.parametrize("store", ["native", "int8", "int4"])
def test_within_budget_keeps_the_most_tokens_that_fit(tiny, doc_text, store):
    cache = encode(tiny, doc_text, presses=["snapkv"])
    storage = None if store == "native" else make_storage(store, head_dim=cache.meta["head_dim"])
    full = compress(cache, "snapkv", ratio=0.0, storage=storage).nbytes_stored
    for room in (1, full // 3, full // 2 + 7, full, full * 2):
        small = within_budget(cache, "snapkv", room, storage)
        step = small.meta["compression"]
        n, framing = step["n_doc_kept"], step["framing_bytes"]
        assert framing == compress(cache, "snapkv", keep=0, storage=storage).nbytes_stored > 0
        assert small.nbytes_stored - framing <= room and step["max_bytes"] == room
        if n < cache.n_tokens - cache.meta["n_protected"]:  # one more token would not have fitted
            assert compress(cache, "snapkv", keep=n + 1, storage=storage).nbytes_stored - framing > room
        assert n > 0 or room < 1000


def test_budget_config_is_checked_before_any_work():
    with pytest.raises(LoramemError, match="training format"):
        flat_spec(ratios=[], formats=[], modes=["none"], budget_bytes=[10**6], budget_ranks=[0, 4])
    with pytest.raises(LoramemError, match="at least one budget rank"):
        flat_spec(ratios=[], budget_bytes=[10**6], budget_ranks=[])
    with pytest.raises(LoramemError, match="at least one ratio"):
        flat_spec(ratios=[])
    config = flat_spec(ratios=[], formats=[], modes=["none"], budget_bytes=[5, 3, 5], budget_ranks=[0])
    assert config.budget_bytes == [3, 5] and config.record()["budget_bytes"] == [3, 5]
    too_small = flat_spec(ratios=[], formats=["qa"], budget_bytes=[100, 9000], budget_ranks=[4, 2])
    assert budget_points(too_small, {2: 4096, 4: 8192}) == [(9000, 2), (9000, 4)]
    with pytest.raises(LoramemError, match="fits in any budget"):
        budget_points(too_small, {2: 40960, 4: 81920})


@pytest.fixture(scope="module")
def budget_run(tiny, dataset, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("runs") / "budget"
    config = flat_spec(ratios=[], presses=["snapkv"], formats=["qa"], budget_bytes=BUDGETS, budget_ranks=RANKS, **FAST)
    return out, config, run_eval(tiny, dataset, out, config)


def test_budget_points_spend_the_budget_on_adapter_and_kv(tiny, budget_run):
    out, config, summary = budget_run
    sizes = budget_sizes(tiny, config)
    assert sizes == {0: 0, 2: 16384, 4: 32768, 8: 65536}  # 2 layers x 1024 parameters per rank, float32
    rows = read_answers(out / ANSWERS)
    n_questions = 3 * 2
    # rank 8 alone exceeds both budgets: left out; the others with qa (rank > 0) or none (rank 0).
    assert len(rows) == len({cell_key(r) for r in rows}) == n_questions * len(BUDGETS) * 3
    for r in rows:
        assert r["ratio"] is None and r["variant"] == f"budget {r['budget_bytes']} r{r['adapter_rank']}"
        assert (r["mode"], r["format"]) == (("decode", "qa") if r["adapter_rank"] else ("none", None))
        assert r["adapter_bytes"] == sizes[r["adapter_rank"]]
        assert r["total_bytes"] == r["adapter_bytes"] + r["document_kv_bytes"] <= r["budget_bytes"]
        assert 0 <= r["document_kv_bytes"] < r["kv_bytes"]  # the framing is stored but not counted
        assert r["kv_tokens_kept"] <= r["document_tokens"]
    for budget in BUDGETS:  # more adapter, fewer tokens; at the same rank, a larger budget keeps more
        per_rank = {}
        for r in rows:
            if r["budget_bytes"] == budget:
                per_rank.setdefault(r["adapter_rank"], set()).add((r["doc_id"], r["kv_tokens_kept"]))
        kept = {rank: sum(n for _, n in pairs) for rank, pairs in per_rank.items()}
        assert kept[0] > kept[2] > kept[4]
    # Rank 4 is the run's --rank: its adapters keep the plain DOCID-FORMAT name, so ratio cells would share them.
    assert sorted(p.name for p in (out / "adapters").iterdir()) == sorted(
        f"{file_name(d)}-qa{suffix}" for d in ("doc-a", "doc-b", "doc c/3") for suffix in ("", "-r2")
    )
    assert (out / BUDGET_PLOT).read_bytes().startswith(b"\x89PNG") and not (out / CURVES).exists()
    assert (out / BUDGET_PLOT_CONTAINS).read_bytes().startswith(b"\x89PNG")

    points = summary["budget"]
    assert len(points) == len(BUDGETS) * 3 and summary["cells"] == []
    for p in points:
        assert p["n"] == n_questions and p["adapter_share"] == round(sizes[p["adapter_rank"]] / p["budget_bytes"], 4)
        assert ("versus_kv_only" in p) == (p["adapter_rank"] > 0)
    assert json.loads((out / SUMMARY).read_text())["budget"] == points
