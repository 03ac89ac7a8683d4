"""inspect's maps: a cache's keep shares per token and layer, two caches compared, an adapter's update norms and
adapters' cosines (against materialized updates in float64), their plots, refusals, and that no model is loaded."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DOC, run_cli

from loramem.inspection.kept import kept_map, token_texts
from loramem.inspection.updates import compare_adapters, norm_table, read_updates
from loramem.kv.compress import compress
from loramem.kv.encode import encode
from loramem.kv.value_groups import compress_value_groups
from loramem.specs import InspectSpec

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def full(tiny, doc_text):
    return encode(tiny, doc_text, presses=["snapkv", "knorm"])


@pytest.fixture(scope="module")
def files(full, tmp_path_factory):
    """The full cache, snapkv and knorm at ratio 0.5, a value-group cache and an int8-stored one, as files."""
    folder = tmp_path_factory.mktemp("inspect")
    caches = {
        "full": full,
        "snapkv": compress(full, "snapkv", ratio=0.5),
        "knorm": compress(full, "knorm", ratio=0.5),
        "groups": compress_value_groups(full, "knorm", groups=4, budget=0.3),
    }
    paths = {name: folder / f"{name}.kv" for name in caches}
    for name, cache in caches.items():
        paths[name].write_bytes(cache.to_bytes())
    paths["int8"] = folder / "int8.kv"
    result = run_cli("compress", str(paths["snapkv"]), "--store-dtype", "int8", "-o", str(paths["int8"]))
    assert result.returncode == 0, result.stderr.decode()
    return paths


def inspect_json(*args: str, input: bytes | None = None) -> dict:
    result = run_cli("inspect", *args, "--json", input=input)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def refused(result, code: int) -> str:
    err = result.stderr.decode()
    assert result.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def hand_counts(cache) -> tuple[list[float], list[list[float]]]:
    """Per token: the share of (layer, head) slots whose kept positions include it; and per layer, of heads."""
    layers, heads = cache.n_layers, cache.positions[0].shape[0]
    counts = [[0] * cache.n_tokens for _ in range(layers)]
    for layer, positions in enumerate(cache.positions):
        for head in range(heads):
            for p in positions[head].tolist():
                counts[layer][p] += 1
    per_layer = [[c / heads for c in row] for row in counts]
    return [sum(row[t] for row in counts) / (layers * heads) for t in range(cache.n_tokens)], per_layer


def test_keep_shares_equal_a_hand_count(files, tiny):
    from loramem.kv.cache import KVCache

    snap = KVCache.load(files["snapkv"])
    overall, per_layer = hand_counts(snap)
    shown = inspect_json(str(files["snapkv"]), "--kept")
    assert [t["share"] for t in shown["tokens"]] == pytest.approx(overall, abs=1e-6)
    for layer, shares in enumerate(per_layer):
        assert [t["per_layer"][layer] for t in shown["tokens"]] == pytest.approx(shares, abs=1e-6)
    protected = snap.meta["n_protected"]
    assert shown["framing_tokens"] == protected and all(t["share"] == 1 for t in shown["tokens"][:protected])
    assert shown["document_share_kept"] == pytest.approx(sum(overall[protected:]) / (snap.n_tokens - protected))
    # the tokenizer beside the model directory decodes the ids, checked against the cache's vocabulary hash
    assert shown["decoded"] and [t["text"] for t in shown["tokens"]] == [
        tiny.tokenizer.decode([i]) for i in snap.token_ids.tolist()
    ]
    one = inspect_json(str(files["snapkv"]), "--kept", "--layer", "1", "--head", "0")
    kept = set(snap.positions[1][0].tolist())
    assert [t["share"] for t in one["tokens"]] == [float(i in kept) for i in range(snap.n_tokens)]
    head = kept_map(snap, InspectSpec(head=1))
    by_hand = [sum(i in set(p[1].tolist()) for p in snap.positions) / snap.n_layers for i in range(snap.n_tokens)]
    assert head.share.tolist() == pytest.approx(by_hand)


def test_the_terminal_map_shades_tokens_and_cuts_long_documents(files):
    result = run_cli("inspect", str(files["snapkv"]), "--kept", "--max-tokens", "20")
    out = result.stdout.decode()
    assert result.returncode == 0 and "all layers, all KV heads" in out and "kept by:" in out
    assert "The Lighthouse" in out and "--max-tokens" in out and "framing tokens" in out
    assert "more tokens not shown" not in run_cli("inspect", str(files["snapkv"]), "--kept").stdout.decode()


def test_without_the_tokenizer_the_map_shows_token_ids(files):
    from loramem.kv.cache import KVCache

    cache = KVCache.load(files["snapkv"])
    cache.meta["model"]["tokenizer_sha256"] = "0" * 64  # another vocabulary than the one on this machine
    assert token_texts(cache) is None
    cache.meta["model"]["id"] = "nobody-has/this-model-1b"
    km = kept_map(cache, InspectSpec(kept=True))
    assert km.texts is None and km.label(40) == f"[{int(cache.token_ids[40])}]"
    assert km.to_json()["decoded"] is False and km.to_json()["tokens"][40]["text"] is None


def test_snapkv_and_knorm_overlap(files):
    from loramem.kv.cache import KVCache

    a, b = KVCache.load(files["snapkv"]), KVCache.load(files["knorm"])
    shown = inspect_json(str(files["snapkv"]), str(files["knorm"]))
    heads = a.positions[0].shape[0]
    for layer, row in enumerate(shown["layers"]):
        slots_a = {(h, p) for h in range(heads) for p in a.positions[layer][h].tolist()}
        slots_b = {(h, p) for h in range(heads) for p in b.positions[layer][h].tolist()}
        assert row["slot_jaccard"] == pytest.approx(len(slots_a & slots_b) / len(slots_a | slots_b), abs=1e-6)
        tokens_a, tokens_b = {p for _, p in slots_a}, {p for _, p in slots_b}
        assert row["token_jaccard"] == pytest.approx(len(tokens_a & tokens_b) / len(tokens_a | tokens_b), abs=1e-6)
        assert row["only_first"] == sorted(tokens_a - tokens_b) and row["only_second"] == sorted(tokens_b - tokens_a)
        assert 0 < row["slot_jaccard"] < 1  # two presses keep different tokens
    anywhere_a = set().union(*(set(p.flatten().tolist()) for p in a.positions))
    anywhere_b = set().union(*(set(p.flatten().tolist()) for p in b.positions))
    assert [t["index"] for t in shown["only_first_anywhere"]] == sorted(anywhere_a - anywhere_b)
    assert [c["press"] for c in shown["caches"]] == ["snapkv", "knorm"]
    same = inspect_json(str(files["snapkv"]), str(files["snapkv"]))
    assert all(row["slot_jaccard"] == 1.0 and not row["only_first"] for row in same["layers"])
    table = run_cli("inspect", str(files["snapkv"]), str(files["knorm"])).stdout.decode()
    assert "Jaccard" in table and "tokens only" in table


def test_a_value_group_cache_shows_the_share_of_token_group_pairs(files):
    from loramem.kv.cache import KVCache

    cache = KVCache.load(files["groups"])
    shown = inspect_json(str(files["groups"]), "--kept")
    assert shown["value_groups"] == 4
    heads = cache.masks[0].shape[0]
    for layer, (positions, mask) in enumerate(zip(cache.positions, cache.masks)):
        pairs = [0] * cache.n_tokens
        for h in range(heads):
            for p, groups in zip(positions[h].tolist(), mask[h].sum(-1).tolist()):
                pairs[p] += groups
        assert [t["per_layer"][layer] for t in shown["tokens"]] == pytest.approx([c / (heads * 4) for c in pairs])
    assert "value groups" in run_cli("inspect", str(files["groups"]), "--kept").stdout.decode()
    mixed = inspect_json(str(files["groups"]), str(files["knorm"]))
    assert all(0 < row["slot_jaccard"] <= 1 for row in mixed["layers"])


def test_a_quantized_cache_says_its_storage(files):
    shown = inspect_json(str(files["int8"]), "--kept")
    assert shown["storage"] == "int8"
    assert [t["share"] for t in shown["tokens"]] == [
        t["share"] for t in inspect_json(str(files["snapkv"]), "--kept")["tokens"]
    ]
    assert "stored as int8" in run_cli("inspect", str(files["int8"]), "--kept").stdout.decode()


def test_a_cache_on_stdin(files, tmp_path):
    data = files["snapkv"].read_bytes()
    assert inspect_json("-", "--kept", input=data) == inspect_json(str(files["snapkv"]), "--kept")
    piped = inspect_json("-", str(files["knorm"]), input=data)
    assert (
        piped["caches"][0]["source"] == "stdin"
        and piped["layers"] == inspect_json(str(files["snapkv"]), str(files["knorm"]))["layers"]
    )
    plot = tmp_path / "stdin.png"
    assert run_cli("inspect", "-", "--plot", str(plot), input=data).returncode == 0 and png_size(plot)[0] > 500


def test_refusals_are_one_line_with_their_exit_code(files, tiny, other_tiny_dir, tmp_path):
    from loramem import load_model

    other_doc = tmp_path / "other.kv"
    other_doc.write_bytes(encode(tiny, DEMO_DOC.read_text()[:400], presses=["knorm"]).to_bytes())
    assert "different documents" in refused(run_cli("inspect", str(files["snapkv"]), str(other_doc)), 3)
    other_model = tmp_path / "other_model.kv"
    other_model.write_bytes(encode(load_model(str(other_tiny_dir)), DEMO_DOC.read_text(), presses=["knorm"]).to_bytes())
    assert "different models" in refused(run_cli("inspect", str(files["snapkv"]), str(other_model)), 3)
    snap = str(files["snapkv"])
    assert "stdin" in refused(run_cli("inspect", "-", "-", input=b""), 2)
    assert "two caches" in refused(run_cli("inspect", snap, snap, snap), 2)
    assert "--layer 2" in refused(run_cli("inspect", snap, "--kept", "--layer", "2"), 2)
    assert "--head" in refused(run_cli("inspect", snap, "--kept", "--head", "-1"), 2)
    assert "one cache" in refused(run_cli("inspect", snap, snap, "--kept"), 2)
    assert "not a safetensors" in refused(run_cli("inspect", "-", "--kept", input=b"not a cache"), 2)


# ---- adapters: update norms and cosines from the factors, against the materialized updates


def make_adapter(folder: Path, seed: int, config: dict | None = None, shapes: dict | None = None) -> Path:
    """A PEFT LoRA folder written by hand: random A and B (B nonzero) for q_proj and v_proj of two layers."""
    from safetensors.torch import save_file

    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **(config or {})}
    config.setdefault("base_model_name_or_path", "tiny-base")
    shapes = shapes or {"q_proj": (64, 64), "v_proj": (32, 64)}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for module, (out, inner) in shapes.items():
            name = f"model.layers.{layer}.self_attn.{module}"
            rank = next((r for k, r in (config.get("rank_pattern") or {}).items() if name.endswith(k)), config["r"])
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, inner, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=generator)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def materialized(folder: Path) -> dict[tuple[int, str], torch.Tensor]:
    """Each module's dW = scale * B @ A as a dense float64 matrix, with PEFT's scaling rules spelled out."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for layer in range(2):
        for module in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            rank = (config.get("rank_pattern") or {}).get(module, config["r"])
            alpha = (config.get("alpha_pattern") or {}).get(module, config["lora_alpha"])
            scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            b, a = tensors[f"{prefix}.lora_B.weight"].double(), tensors[f"{prefix}.lora_A.weight"].double()
            out[(layer, f"self_attn.{module}")] = scale * b @ a
    return out


def tolerance(dense: torch.Tensor, rank: int) -> float:
    """Relative error allowed: the Gram route sums products over the inner dimension and the rank (r^2 terms after
    in- or out-length dot products) where the dense norm sums out x in squares; float64 rounding grows with those
    reduction lengths, so a few epsilons per summed term."""
    terms = rank * rank + max(dense.shape) + dense.numel()
    return 4 * terms * torch.finfo(torch.float64).eps


ADAPTERS = {
    "plain": {},
    "patterns": {"r": 4, "lora_alpha": 16, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3}},
    "rslora": {"r": 4, "lora_alpha": 4, "use_rslora": True},
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    made = {name: make_adapter(folder / name, seed, config) for seed, (name, config) in enumerate(ADAPTERS.items())}
    made["plain2"] = make_adapter(folder / "plain2", 7)
    made["wide"] = make_adapter(folder / "wide", 8, shapes={"q_proj": (64, 64), "v_proj": (64, 64)})
    made["other_base"] = make_adapter(folder / "other_base", 9, {"base_model_name_or_path": "another/model"})
    return made


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_update_norms_equal_the_materialized_frobenius_norm(adapters, name):
    dense = materialized(adapters[name])
    updates = read_updates(adapters[name])
    assert set(updates.factors) == set(dense)
    for key, factor in updates.factors.items():
        expected = float(torch.linalg.matrix_norm(dense[key]))
        assert abs(factor.norm() - expected) <= tolerance(dense[key], factor.a.shape[0]) * expected, key
    table = norm_table(updates)
    assert table["layers"] == [0, 1] and table["modules"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert table["frobenius"] == [
        [round(updates.factors[(layer, m)].norm(), 8) for m in table["modules"]] for layer in (0, 1)
    ]
    shown = inspect_json(str(adapters[name]))
    assert shown["update_norms"] == json.loads(json.dumps(table))


def test_cosines_equal_those_of_the_materialized_updates(adapters):
    names = ["plain", "patterns", "plain2"]
    result = compare_adapters([read_updates(adapters[n]) for n in names])
    dense = [materialized(adapters[n]) for n in names]
    for i in range(3):
        for j in range(3):
            flat_i = torch.cat([m.flatten() for m in dense[i].values()])
            flat_j = torch.cat([m.flatten() for m in dense[j].values()])
            expected = float(flat_i @ flat_j / (flat_i.norm() * flat_j.norm()))
            assert result["cosine"][i][j] == pytest.approx(expected, abs=1e-7)  # rounded to 8 places
    first = next(p for p in result["per_layer"] if p["adapters"] == [0, 1])
    for layer, value in enumerate(first["cosine"]):
        a = torch.cat([m.flatten() for (lay, _), m in dense[0].items() if lay == layer])
        b = torch.cat([m.flatten() for (lay, _), m in dense[1].items() if lay == layer])
        assert value == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-7)
    assert inspect_json(*(str(adapters[n]) for n in names))["cosine"] == result["cosine"]
    table = run_cli("inspect", str(adapters["plain"]), str(adapters["plain"])).stdout.decode()
    assert "cosine per layer" in table and "1" in table


def test_adapters_that_do_not_compare_are_refused(adapters, files, tmp_path):
    fingerprinted = {}
    for name, fingerprint in (("f1", "aaaa"), ("f2", "bbbb")):
        fingerprinted[name] = make_adapter(tmp_path / name, 3)
        record = {"base_model": {"id": "tiny-base", "model": fingerprint}}
        (fingerprinted[name] / "loramem.json").write_text(json.dumps(record))
    assert "base models" in refused(run_cli("inspect", str(fingerprinted["f1"]), str(fingerprinted["f2"])), 3)
    # one records a fingerprint, the other only a name: the names decide
    assert run_cli("inspect", str(fingerprinted["f1"]), str(adapters["plain"])).returncode == 0
    assert "modules or shapes" in refused(run_cli("inspect", str(adapters["plain"]), str(adapters["wide"])), 3)
    assert "base models" in refused(run_cli("inspect", str(adapters["plain"]), str(adapters["other_base"])), 3)
    assert "not both" in refused(run_cli("inspect", str(adapters["plain"]), str(files["snapkv"])), 2)
    assert "adapter has none" in refused(run_cli("inspect", str(adapters["plain"]), "--kept"), 2)


def test_plots_are_pngs(files, adapters, tmp_path):
    runs = {
        "kept": [str(files["snapkv"])],
        "layer": [str(files["groups"]), "--kept", "--layer", "1"],
        "pair": [str(files["snapkv"]), str(files["knorm"])],
        "norms": [str(adapters["patterns"])],
        "cosines": [str(adapters["plain"]), str(adapters["patterns"]), str(adapters["plain2"])],
    }
    for name, args in runs.items():
        plot = tmp_path / f"{name}.png"
        result = run_cli("inspect", *args, "--plot", str(plot))
        assert result.returncode == 0, (name, result.stderr.decode())
        width, height = png_size(plot)
        assert width >= 500 and height >= 250, (name, width, height)
    assert "does not exist" in refused(
        run_cli("inspect", str(files["snapkv"]), "--plot", str(tmp_path / "no/x.png")), 2
    )


def test_inspect_loads_no_model(files, adapters, tmp_path):
    """The maps read files only: transformers' model classes (and peft) are never imported, nor any weights read."""
    code = (
        "import sys\nsys.argv = ['loramem', *sys.argv[1:]]\nfrom loramem.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print([m for m in sys.modules if m.startswith(('transformers.models', 'peft', 'kvpress'))], file=sys.stderr)"
    )
    for args in (
        [str(files["snapkv"]), "--kept", "--plot", str(tmp_path / "a.png")],
        [str(files["snapkv"]), str(files["knorm"]), "--json"],
        [str(adapters["plain"]), str(adapters["plain2"])],
    ):
        result = subprocess.run(
            [sys.executable, "-c", code, "inspect", *args], capture_output=True, text=True, timeout=120
        )
        assert result.stderr.strip().splitlines()[-1] == "[]", (args, result.stderr)


@pytest.mark.real
def test_the_default_models_cache_at_ratio_0_9_is_mapped_in_its_own_words(real, doc_text, tmp_path):
    """The default model's tokenizer is read from its converted copy (tokenizer.json alone): the map shows the
    document's text, and a 0.9 ratio keeps a tenth of each slot's document tokens, more in some places than others."""
    cache = compress(encode(real, doc_text, presses=["snapkv"]), "snapkv", ratio=0.9)
    path = tmp_path / "default.kv"
    path.write_bytes(cache.to_bytes())
    shown = inspect_json(str(path), "--kept")
    protected = shown["framing_tokens"]
    assert shown["decoded"] and shown["layers"] == 30 and shown["kv_heads"] == 3
    assert "".join(t["text"] for t in shown["tokens"][protected:]) == doc_text
    kept_per_slot = cache.positions[0].shape[1] - protected
    assert shown["document_share_kept"] == pytest.approx(kept_per_slot / (cache.n_tokens - protected), abs=1e-6)
    shares = [t["share"] for t in shown["tokens"][protected:]]
    assert min(shares) == 0 and max(shares) == 1  # some tokens no slot keeps, some (the window) every slot
    out = run_cli("inspect", str(path), "--kept").stdout.decode()
    assert "Varnaby Point" in out and "[ids]" not in out
    plot = tmp_path / "default.png"
    assert run_cli("inspect", str(path), "--plot", str(plot)).returncode == 0 and png_size(plot)[1] > 400


@pytest.mark.parametrize("scaling", [{}, {"alpha_pattern": {"v_proj": 3}, "use_rslora": True}])
def test_a_trained_adapters_norms_equal_peft_delta_weights(tiny, tiny_dir, doc_text, tmp_path, scaling):
    """PEFT's own ΔW (get_delta_weight) for every module, its scaling read by PEFT from the config: the names,
    layers and scales that inspect reads are PEFT's."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from loramem.adapters.train import train_adapter
    from loramem.specs import TrainSpec

    out = tmp_path / "doc.lora"
    train_adapter(tiny, doc_text, [("Who designed it?", "Orla Quenby")], out, TrainSpec(rank=4, steps=2, batch_size=1))
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, **scaling}))
    table = norm_table(read_updates(out))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_dir)), str(out))
    seen = 0
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            layer = int(name.split(".layers.")[1].split(".")[0])
            column = table["modules"].index(name.split(f".layers.{layer}.")[1])
            delta = module.get_delta_weight("default").double()
            assert table["frobenius"][table["layers"].index(layer)][column] == pytest.approx(
                float(torch.linalg.matrix_norm(delta)),
                rel=1e-5,  # PEFT forms ΔW in float32
            )
            seen += 1
    assert seen == sum(v is not None for row in table["frobenius"] for v in row) > 0
