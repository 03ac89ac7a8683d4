"""Value-group eviction: budget accounting, storage, attention equal to a plain-tensor reference, query scores."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from loramem import KVCache, LoramemError, encode, generate
from loramem.kv.value_groups import compress_value_groups, head_masks, query_group_scores
from loramem.model.loading import sha256_text
from loramem.model.prompt import Framing, question_ids

QUESTION = "Who designed the lighthouse?"
QUESTIONS = [QUESTION, "When was the light automated?"]


@pytest.fixture(scope="module")
def cache(tiny, doc_text):
    return encode(tiny, doc_text, presses=["snapkv", "knorm"])


def test_budget_is_kept_exactly(cache):
    small = compress_value_groups(cache, "knorm", groups=4, budget=0.3)
    protected = cache.meta["n_protected"]
    expected = round(0.3 * (cache.n_tokens - protected) * 4) + protected * 4
    for mask in small.masks:
        assert mask.sum(dim=(1, 2)).tolist() == [expected] * mask.shape[0]
    for v, mask in zip(small.values, small.masks):
        dropped = ~mask.repeat_interleave(v.shape[-1] // 4, dim=-1)
        assert bool((v[dropped] == 0).all())


def test_round_trip_packs_only_what_is_kept(cache):
    small = compress_value_groups(cache, "snapkv", groups=4, budget=0.25)
    back = KVCache.from_bytes(small.to_bytes())
    for a, b in zip(small.keys + small.values, back.keys + back.values):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(small.masks, back.masks))
    packed_values = sum(int(m.sum()) for m in small.masks) * (small.values[0].shape[-1] // 4)
    dense_values = sum(v.numel() for v in small.values)
    assert packed_values < dense_values / 2


def test_full_budget_answers_like_the_full_cache(tiny, cache):
    everything = compress_value_groups(cache, "knorm", groups=4, budget=1.0)
    assert (
        generate(tiny, QUESTION, everything, max_new_tokens=6).answer
        == generate(tiny, QUESTION, cache, max_new_tokens=6).answer
    )


def test_attention_equals_plain_tensor_reference(tiny, cache):
    """Layer 0 output with dropped groups and per-head token sets, against softmax(qK^T)V by hand."""
    small = compress_value_groups(cache, "knorm", groups=4, budget=0.2)
    frame = Framing.from_dict(cache.meta["framing"])
    q_ids = torch.tensor([question_ids(tiny.tokenizer, frame, QUESTION, after_document=True)])
    attn = tiny.model.model.layers[0].self_attn
    seen = {}

    def capture(module, args, kwargs, output):
        seen["hidden"], seen["rope"], seen["out"] = kwargs["hidden_states"], kwargs["position_embeddings"], output[0]

    hook = attn.register_forward_hook(capture, with_kwargs=True)
    present = [m.any(-1) for m in small.masks]
    position = torch.arange(cache.n_tokens, cache.n_tokens + q_ids.shape[1])[None]
    with torch.inference_mode(), head_masks(tiny.model, present):
        tiny.model(input_ids=q_ids, past_key_values=small.to_dynamic_cache(), position_ids=position)
    hook.remove()

    hidden, (cos, sin) = seen["hidden"], seen["rope"]
    d, rep = attn.head_dim, attn.num_key_value_groups
    q = attn.q_proj(hidden).view(1, -1, tiny.config.num_attention_heads, d).transpose(1, 2)
    k = attn.k_proj(hidden).view(1, -1, tiny.config.num_key_value_heads, d).transpose(1, 2)
    v = attn.v_proj(hidden).view(1, -1, tiny.config.num_key_value_heads, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    n_q = q.shape[2]
    heads = []
    for head in range(q.shape[1]):
        kv_head = head // rep
        keep = present[0][kv_head]
        keys = torch.cat([small.keys[0][kv_head][keep], k[0, kv_head]])
        values = torch.cat([small.values[0][kv_head][keep], v[0, kv_head]])  # dropped groups are zero
        logits = q[0, head] @ keys.T * attn.scaling
        n_cached = int(keep.sum())
        causal = torch.ones(n_q, n_q).triu(1).bool()
        logits[:, n_cached:] = logits[:, n_cached:].masked_fill(causal, float("-inf"))
        heads.append(logits.softmax(-1) @ values)
    reference = attn.o_proj(torch.stack(heads, 1).reshape(1, n_q, -1))
    assert torch.allclose(seen["out"], reference, atol=1e-5)


@pytest.mark.parametrize(
    "groups,budget,message",
    [(5, 0.5, "does not divide"), (4, 0.0, r"budget: must be in \(0, 1\]"), (4, 1.5, r"budget: must be in \(0, 1\]")],
)
def test_bad_value_group_requests(cache, groups, budget, message):
    with pytest.raises(LoramemError, match=message):
        compress_value_groups(cache, "knorm", groups=groups, budget=budget)


@pytest.fixture(scope="module")
def reference_attention(tiny, tiny_dir, cache):
    """Per layer [kv_heads, doc]: an eager full forward over prefix + document + question, the question rows
    of its attention weights averaged over each KV head's query heads, the question tokens and the questions."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), attn_implementation="eager")
    frame = Framing.from_dict(cache.meta["framing"])
    protected, n = cache.meta["n_protected"], cache.n_tokens
    kv_heads = model.config.num_key_value_heads
    rep = model.config.num_attention_heads // kv_heads
    total = [torch.zeros(kv_heads, n - protected) for _ in range(cache.n_layers)]
    for question in QUESTIONS:
        ids = cache.token_ids.tolist() + question_ids(tiny.tokenizer, frame, question, after_document=True)
        with torch.inference_mode():
            attentions = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
        for layer, weights in enumerate(attentions):
            rows = weights[0, :, n:, protected:n]  # [heads, question tokens, document tokens]
            for kv in range(kv_heads):
                total[layer][kv] += rows[kv * rep : (kv + 1) * rep].mean(dim=(0, 1)) / len(QUESTIONS)
    return total


@pytest.fixture(scope="module")
def query_scores(tiny, cache):
    return query_group_scores(tiny, cache, QUESTIONS, groups=4)


def _reference_pairs(cache, attention, layer):
    """attention [H, doc] x L2 norm of each 4-channel value group (head_dim 16, 4 groups)."""
    v = cache.values[layer][:, cache.meta["n_protected"] :]
    norms = torch.stack([v[..., g * 4 : (g + 1) * 4].norm(dim=-1) for g in range(4)], dim=-1)
    return attention[layer].unsqueeze(-1) * norms


def test_query_scores_are_attention_times_group_norms(tiny, cache, query_scores, reference_attention):
    assert tiny.config._attn_implementation == "sdpa"  # eager only while scoring
    assert all(bool(a.gt(0).all()) for a in reference_attention)
    for layer, pairs in enumerate(query_scores.pairs):
        assert torch.allclose(pairs, _reference_pairs(cache, reference_attention, layer), atol=1e-6)


def test_query_cache_keeps_the_top_pairs_and_answers(tiny, cache, query_scores, reference_attention):
    small = compress_value_groups(cache, "snapkv", groups=4, budget=0.3, rule="query", scores=query_scores)
    step = small.meta["compression"]
    assert step["score_groups"] == "query" and step["press"] is None
    assert step["query"]["questions_sha256"] == sha256_text(json.dumps(QUESTIONS))
    assert step["query"]["n_questions"] == 2 and "attention" in step["query"]["rule"]
    protected = cache.meta["n_protected"]
    n_pairs = round(0.3 * (cache.n_tokens - protected) * 4)
    for layer, mask in enumerate(small.masks):
        full = torch.zeros(mask.shape[0], cache.n_tokens, 4, dtype=torch.bool)
        full[:, small.positions[layer][0]] = mask
        kept, reference = full[:, protected:], _reference_pairs(cache, reference_attention, layer)
        for head in range(mask.shape[0]):
            assert int(kept[head].sum()) == n_pairs
            assert reference[head][kept[head]].min() >= reference[head][~kept[head]].max() - 1e-6
        assert bool(small.keys[layer][~mask.any(-1)].eq(0).all())  # keys only for tokens keeping a group
    back = KVCache.from_bytes(small.to_bytes())
    assert back.meta["compression"]["query"] == step["query"]
    assert generate(tiny, QUESTION, back, max_new_tokens=4).new_tokens > 0


def test_query_rule_needs_its_scores(cache, query_scores):
    with pytest.raises(LoramemError, match="score_groups, query: query needs questions"):
        compress_value_groups(cache, "knorm", groups=4, budget=0.3, rule="query")
    with pytest.raises(LoramemError, match="does not use a question"):
        compress_value_groups(cache, "knorm", groups=4, budget=0.3, rule="norm", scores=query_scores)
    with pytest.raises(LoramemError, match="another --groups"):
        compress_value_groups(cache, "knorm", groups=2, budget=0.3, rule="query", scores=query_scores)
