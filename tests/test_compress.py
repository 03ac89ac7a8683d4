"""compress: which tokens are kept, nesting, --keep, re-compression, and agreement with kvpress."""

from __future__ import annotations

import itertools

import pytest
import torch
from kvpress_reference import assert_agrees, kvpress_prefills

from loramem import LoramemError, compress, encode
from loramem.kv.compress import n_kept
from loramem.specs import CompressSpec
from loramem.vocab import DEFAULT_PRESSES

RATIOS = (0.25, 0.5, 0.9)


@pytest.fixture(scope="module")
def chat_cache(tiny, doc_text):
    return encode(tiny, doc_text)


@pytest.fixture(scope="module")
def raw_cache(tiny, doc_text):
    """Raw framing: the whole prefill is the document, exactly what kvpress compresses."""
    return encode(tiny, doc_text, framing="raw")


def test_n_kept_counts_like_kvpress():
    from kvpress.utils import compute_n_kept

    for n in (1, 5, 64, 333, 2000):
        for ratio in (0.0, 0.1, 0.25, 0.333, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0):
            expected = n if ratio == 0 else compute_n_kept(n, ratio)
            assert n_kept(n, ratio) == expected


@pytest.mark.parametrize("press", DEFAULT_PRESSES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_agrees_with_kvpress_on_tiny_model(tiny, raw_cache, press, ratio):
    assert_agrees(tiny, raw_cache, press, [ratio])


def test_one_prefill_equals_a_prefill_per_setting(tiny, raw_cache):
    """The reference's shortcut (one kvpress prefill feeding every press and ratio's own hook) is exactly kvpress
    run once per setting, whichever setting leads."""
    settings = [(press, ratio) for ratio in (0.9, 0.25, 0.5) for press in DEFAULT_PRESSES]
    shared = kvpress_prefills(tiny, raw_cache, settings)
    for setting, small in zip(settings, shared):
        (alone,) = kvpress_prefills(tiny, raw_cache, [setting])
        assert len(small.layers) == len(alone.layers) == tiny.config.num_hidden_layers
        for mine, theirs in zip(small.layers, alone.layers):
            assert mine.keys.shape[-2] < raw_cache.n_tokens
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values), setting


@pytest.mark.parametrize("press", DEFAULT_PRESSES)
def test_eviction_is_nested(chat_cache, press):
    kept = [compress(chat_cache, press, ratio=r).positions for r in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)]
    for low, high in itertools.pairwise(kept):
        for layer_low, layer_high in zip(low, high):
            for head_low, head_high in zip(layer_low.tolist(), layer_high.tolist()):
                assert set(head_high) <= set(head_low)


def test_ratio_endpoints_keep_all_or_only_the_framing(chat_cache):
    full = compress(chat_cache, "snapkv", ratio=0.0)
    assert full.kept_per_layer == [chat_cache.n_tokens] * chat_cache.n_layers
    empty = compress(chat_cache, "snapkv", ratio=1.0)
    protected = chat_cache.meta["n_protected"]
    assert empty.kept_per_layer == [protected] * chat_cache.n_layers
    assert torch.equal(empty.positions[0][0], torch.arange(protected))


def test_keep_a_fixed_number_of_tokens(chat_cache):
    small = compress(chat_cache, "knorm", keep=10)
    assert small.kept_per_layer == [chat_cache.meta["n_protected"] + 10] * chat_cache.n_layers
    assert small.meta["compression"] == {**small.meta["compression"], "press": "knorm", "keep": 10}


def test_compressing_a_compressed_cache_equals_compressing_the_original(chat_cache):
    twice = compress(compress(chat_cache, "snapkv", ratio=0.5), "snapkv", ratio=0.9)
    once = compress(chat_cache, "snapkv", ratio=0.9)
    for a, b in zip(twice.keys + twice.positions, once.keys + once.positions):
        assert torch.equal(a, b)
    assert len(twice.meta["history"]) == 2


def test_cannot_decompress(chat_cache):
    with pytest.raises(LoramemError, match="already compressed"):
        compress(compress(chat_cache, "snapkv", ratio=0.9), "snapkv", ratio=0.5)


def test_press_not_recorded_says_how_to_record_it(tiny, doc_text):
    only_knorm = encode(tiny, doc_text, presses=["knorm"])
    with pytest.raises(LoramemError, match="--score knorm,snapkv"):
        compress(only_knorm, "snapkv", ratio=0.5)


@pytest.mark.parametrize("ratio", (-0.1, 1.5))
def test_ratio_outside_unit_interval(chat_cache, ratio):
    with pytest.raises(LoramemError, match=r"ratio: must be in \[0, 1\]"):
        compress(chat_cache, "snapkv", ratio=ratio)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"ratio": 0.5, "keep": 3}, "ratio, keep: give one, not both"),
        ({}, "ratio, keep, store_dtype: give a ratio"),
        ({"ratio": float("nan")}, "ratio: must be in \\[0, 1\\]"),
        ({"keep": -1}, "keep: must be at least 0"),
        ({"granularity": "tokens", "ratio": 0.5}, "granularity: input should be 'token' or 'value-group'"),
        ({"ratio": 0.5, "query": ["Who?"]}, "query, granularity: questions score value groups"),
        ({"granularity": "value-group"}, "budget: value-group compression needs a budget"),
        ({"granularity": "value-group", "budget": 0.5, "ratio": 0.5}, "ratio, keep: value-group compression keeps"),
        ({"budget": 0.5, "ratio": 0.5}, "budget: value-group settings"),
        ({"granularity": "value-group", "budget": 1.5}, "budget: must be in \\(0, 1\\]"),
        ({"store_dtype": "int3"}, "store_dtype: input should be"),
    ],
)
def test_a_bad_request_is_refused_before_any_cache_is_read(request_, message):
    with pytest.raises(LoramemError, match=message):
        CompressSpec.parse(request_)


def test_the_api_refuses_what_the_command_refuses(chat_cache):
    """`compress` and `compress_cache` called from a script check their request by the command's own spec."""
    for kwargs, message in (
        ({"ratio": 0.5, "keep": 2}, "not both"),
        ({}, "give a ratio"),
        ({"keep": -2}, "keep: must be at least 0"),
    ):
        with pytest.raises(LoramemError, match=message):
            compress(chat_cache, "snapkv", **kwargs)
    for good in ({"ratio": 0.5}, {"keep": 3}, {"store_dtype": "int8"}, {"granularity": "value-group", "budget": 0.5}):
        CompressSpec.parse(good)
    CompressSpec(granularity="value-group", budget=0.5, query=["Who?"])
    assert CompressSpec(ratio=-0.0).ratio == 0.0 and str(CompressSpec(ratio=-0.0).ratio) == "0.0"
    assert CompressSpec(ratio=0.5, press="SnapKV").press == "snapkv"  # as users write press names


def test_one_dispatch_compresses_tokens_value_groups_and_storage(chat_cache):
    """`compress_cache` picks token eviction, value groups or a storage dtype from the spec alone, and gives what
    the underlying functions give."""
    from loramem.kv.compression import compress_cache
    from loramem.kv.quantize import make_storage
    from loramem.kv.value_groups import compress_value_groups

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))

    assert same(compress_cache(chat_cache, CompressSpec(ratio=0.5)), compress(chat_cache, "snapkv", ratio=0.5))
    grouped = compress_cache(chat_cache, CompressSpec(granularity="value-group", budget=0.5, press="knorm"))
    assert same(grouped, compress_value_groups(chat_cache, "knorm", 4, 0.5))
    int8 = compress_cache(chat_cache, CompressSpec(keep=2, store_dtype="int8"))
    expected = compress(
        chat_cache, "snapkv", keep=2, storage=make_storage("int8", head_dim=chat_cache.meta["head_dim"])
    )
    assert same(int8, expected) and int8.meta["storage"]["dtype"] == "int8"


def test_the_command_refuses_a_bad_request_before_reading_the_cache(tmp_path):
    """The cache named does not exist: the request is refused first, with exit 2 and one line."""
    from conftest import run_cli

    missing = str(tmp_path / "missing.kv")
    for args, message in (
        (["--granularity", "tokens", "--ratio", "0.5"], "--granularity: input should be 'token' or 'value-group'"),
        (["--ratio", "0.5", "--keep", "3"], "--ratio, --keep: give one, not both"),
        (["--granularity", "value-group", "--budget", "0.5", "--keep", "3"], "--ratio, --keep: value-group"),
        (["--budget", "0.5", "--ratio", "0.5"], "--budget: value-group settings"),
        (["--press", "snapkvv", "--ratio", "0.5"], "--press: input should be 'snapkv'"),
        (["--ratio", "1.5"], "--ratio: must be in [0, 1] (got 1.5)"),
    ):
        result = run_cli("compress", missing, *args, "-o", str(tmp_path / "out.kv"))
        err = result.stderr.decode()
        assert result.returncode == 2 and len(err.strip().splitlines()) == 1 and message in err, err
