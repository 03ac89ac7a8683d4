"""inspect of an adapter: its size in KV-cache tokens of the base model (the equal-memory comparison)."""

from __future__ import annotations

import json
import shutil

import pytest

from loramem.adapters.attach import LORAMEM_META
from loramem.adapters.train import train_adapter
from loramem.describe import describe_adapter
from loramem.specs import TrainSpec


@pytest.fixture(scope="module")
def adapter(tiny, doc_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("equal") / "doc.lora"
    train_adapter(
        tiny,
        doc_text,
        [("Who designed the lighthouse?", "Orla Quenby")],
        out,
        TrainSpec(rank=16, targets="all", steps=1, batch_size=1),
    )
    return out


def test_adapter_size_in_kv_tokens(adapter, tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    assert (hidden, inter, layers, heads, kv_heads, head_dim, config["dtype"]) == (64, 128, 2, 4, 2, 16, "float32")
    # r x (in + out) per projection: q, k, v, o, gate, up, down
    shapes = [
        (hidden, heads * head_dim),
        (hidden, kv_heads * head_dim),
        (hidden, kv_heads * head_dim),
        (heads * head_dim, hidden),
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ]
    parameters = layers * sum(16 * (i + o) for i, o in shapes)
    per_token = layers * kv_heads * head_dim * 2 * 4  # K and V, fp32
    assert (parameters, per_token) == (32768, 512)

    info = describe_adapter(adapter)
    assert info["parameters"] == info["trainable_parameters"] == parameters
    assert info["tensor_bytes"] == parameters * 4 < info["bytes"]  # adapter stored in fp32; header excluded
    assert info["kv_dtype"] == "float32" and info["kv_bytes_per_token"] == per_token
    assert info["kv_token_equivalents"] == info["kv_token_equivalents_at_kv_dtype"] == parameters * 4 / per_token == 256


def test_base_model_not_on_this_machine_leaves_nulls(adapter, tmp_path):
    copy = tmp_path / "copy.lora"
    shutil.copytree(adapter, copy)
    meta = json.loads((copy / LORAMEM_META).read_text())
    meta["base_model"]["id"] = "nobody-has/this-model-1b"
    (copy / LORAMEM_META).write_text(json.dumps(meta))
    info = describe_adapter(copy)
    assert info["tensor_bytes"] > 0
    assert info["kv_bytes_per_token"] is None and info["kv_token_equivalents"] is None
    assert info["kv_dtype"] is None and info["kv_token_equivalents_at_kv_dtype"] is None
