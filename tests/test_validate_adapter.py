"""Adapter directories checked whole before use (issue 13, defects 3, 4 and 5): config, weights and loramem.json
agree, numbers are finite, another base model is exit 3; a seeded mutation loop over a real adapter finds nothing
that is accepted, crashes or writes output."""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DOC, run_cli
from inprocess import assert_refused, invoke

from loramem import LoramemError
from loramem.adapters.attach import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORAMEM_META, attach_adapter, detach_adapter
from loramem.adapters.train import train_adapter
from loramem.errors import IncompatibleArtifactError
from loramem.specs import TrainSpec

QA = [("Who designed the lighthouse?", "Orla Quenby"), ("Who was the first keeper?", "Hobart Fennick")]


@pytest.fixture(scope="module")
def adapter(tiny, doc_text, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "doc.lora"
    train_adapter(tiny, doc_text, QA, out, TrainSpec(rank=2, alpha=4.0, steps=2, batch_size=2))
    return out


def copy_of(adapter: Path, where: Path) -> Path:
    target = where / "a.lora"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(adapter, target)
    return target


def edit_json(folder: Path, name: str, change: Callable[[dict], object]) -> None:
    data = json.loads((folder / name).read_text())
    result = change(data)
    (folder / name).write_text(json.dumps(result[1] if isinstance(result, tuple) else data))


def edit_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS))


def first(tensors: dict[str, torch.Tensor], part: str) -> str:
    return sorted(k for k in tensors if f"lora_{part}" in k)[0]


def _set_nan(tensors: dict[str, torch.Tensor]) -> None:
    tensors[first(tensors, "B")][0, 0] = float("nan")


def _huge_header(folder: Path) -> None:
    header = json.dumps({"x": {"dtype": "F32", "shape": [2**60], "data_offsets": [0, 2**62]}}).encode()
    (folder / ADAPTER_WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)


def _third_party(folder: Path, **config: object) -> None:
    """A plain PEFT adapter (no loramem.json, so only its weights can contradict its config) with config edits."""
    (folder / LORAMEM_META).unlink()
    edit_json(folder, ADAPTER_CONFIG, lambda c: c.update(config))


# Each adapter defect that issue 13 reports, as one edit of a real adapter folder.
DEFECTS: dict[str, Callable[[Path], None]] = {
    "config is a list": lambda f: (f / ADAPTER_CONFIG).write_text("[1, 2]"),
    "config not UTF-8": lambda f: (f / ADAPTER_CONFIG).write_bytes(b'{"r": "\xff\xfe"}'),
    "r as text": lambda f: edit_json(f, ADAPTER_CONFIG, lambda c: c.update(r="two")),
    "alpha infinite": lambda f: (f / ADAPTER_CONFIG).write_text(
        (f / ADAPTER_CONFIG).read_text().replace('"lora_alpha": 4.0', '"lora_alpha": Infinity')
    ),
    "header claims 2**62 bytes": _huge_header,
    "truncated weights": lambda f: (f / ADAPTER_WEIGHTS).write_bytes((f / ADAPTER_WEIGHTS).read_bytes()[:-100]),
    "NaN weights": lambda f: edit_weights(f, _set_nan),
    "targets narrower than weights": lambda f: _third_party(f, target_modules=["down_proj"]),
    "layers narrower than weights": lambda f: _third_party(f, layers_to_transform=[0]),
    "loramem.json rank disagrees": lambda f: edit_json(f, LORAMEM_META, lambda m: m["hyperparameters"].update(rank=8)),
    "loramem.json is a list": lambda f: (f / LORAMEM_META).write_text("[]"),
    "lora_B missing": lambda f: edit_weights(f, lambda t: t.pop(first(t, "B"))),
    "alpha_pattern overflows": lambda f: _third_party(f, alpha_pattern={"q_proj": 1e30}),
    "rank_pattern not an integer": lambda f: _third_party(f, rank_pattern={"q_proj": 2.5}),
    "use_rslora as text": lambda f: _third_party(f, use_rslora="yes"),
    "fan_in_fan_out as a number": lambda f: _third_party(f, fan_in_fan_out=1),
    "layers_pattern a number": lambda f: _third_party(f, layers_pattern=3),
    "int weights": lambda f: edit_weights(f, lambda t: t.update({first(t, "A"): t[first(t, "A")].to(torch.int32)})),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_defective_adapter_is_refused(adapter, tmp_path, capsys, defect):
    bad = copy_of(adapter, tmp_path)
    DEFECTS[defect](bad)
    assert_refused(invoke(capsys, "inspect", str(bad)), (2,))
    out = tmp_path / "merged"
    assert_refused(invoke(capsys, "merge", str(bad), str(adapter), "-o", str(out)), (2,))
    assert not out.exists()


@pytest.mark.parametrize(
    "field",
    [
        {"use_dora": True},
        {"bias": "all"},
        {"modules_to_save": ["lm_head"]},
        {"lora_bias": True},
        {"target_parameters": ["mlp.experts.down_proj"]},
        {"layer_replication": [[0, 2]]},
        {"init_lora_weights": "pissa"},
        {"alora_invocation_tokens": [1, 2]},
        {"a_future_peft_field": 1},
    ],
)
def test_lora_config_fields_loramem_does_not_compute_are_refused_by_name(adapter, tmp_path, capsys, field):
    bad = copy_of(adapter, tmp_path)
    _third_party(bad, **field)
    line = assert_refused(invoke(capsys, "inspect", str(bad)), (3,))
    assert next(iter(field)) in line and "does not support" in line


def test_supported_lora_config_fields_are_reported(adapter, tmp_path, capsys):
    ok = copy_of(adapter, tmp_path)
    _third_party(ok, use_rslora=True, alpha_pattern={"q_proj": 2.0}, fan_in_fan_out=False, init_lora_weights="gaussian")
    result = invoke(capsys, "inspect", str(ok), "--json")
    assert result.code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["use_rslora"] is True and info["alpha_pattern"] == {"q_proj": 2.0} and info["rank_pattern"] == {}


def test_defective_adapter_is_refused_by_attach(adapter, tiny, tmp_path):
    bad = copy_of(adapter, tmp_path)
    DEFECTS["targets narrower than weights"](bad)
    with pytest.raises(LoramemError, match="not in target_modules"):
        attach_adapter(tiny, bad)
    assert tiny.adapter is None


def test_adapter_naming_another_base_model_is_incompatible(adapter, tiny, tmp_path):
    bad = copy_of(adapter, tmp_path)
    (bad / LORAMEM_META).unlink()
    edit_json(bad, ADAPTER_CONFIG, lambda c: c.update(base_model_name_or_path="meta-llama/Llama-3.1-8B"))
    with pytest.raises(IncompatibleArtifactError, match="another base model"):
        attach_adapter(tiny, bad)
    same = copy_of(adapter, tmp_path)
    (same / LORAMEM_META).unlink()
    attach_adapter(tiny, same)  # the name the adapter was trained under: accepted
    detach_adapter(tiny)


@pytest.mark.parametrize(
    "args",
    [
        ["train-adapter", str(DEMO_DOC), "--lr", "inf"],
        ["train-adapter", str(DEMO_DOC), "--alpha", "inf"],
        ["train-adapter", str(DEMO_DOC), "--lr", "nan"],
        ["train-adapter", str(DEMO_DOC), "--dropout", "nan"],
        ["train-adapter", str(DEMO_DOC), "--lr", "1e39"],
        ["train-adapter", str(DEMO_DOC), "--alpha", "1e30"],
    ],
)
def test_non_finite_training_numbers_exit_2(capsys, tmp_path, args):
    out = tmp_path / "a.lora"
    assert_refused(invoke(capsys, *args, "-o", str(out), "--model", str(tmp_path / "no-model")), (2,))
    assert not out.exists()


@pytest.mark.parametrize("weights", ["nan,1", "1,inf"])
def test_non_finite_merge_weights_exit_2(adapter, capsys, tmp_path, weights):
    out = tmp_path / "m.lora"
    result = invoke(capsys, "merge", str(adapter), str(adapter), "--weights", weights, "-o", str(out))
    assert "finite" in assert_refused(result, (2,))
    assert not out.exists()


def test_diverging_training_stops_and_leaves_nothing(tiny_dir, tmp_path, capsys, monkeypatch):
    """The loss turns NaN at step 2 (as it does when training blows up): exit 2, no adapter folder, no temporary."""
    from loramem.adapters import train

    real, calls = train.batch_loss, []

    def blowing_up(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(train, "batch_loss", blowing_up)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QA))
    out = tmp_path / "out" / "a.lora"
    out.parent.mkdir()
    args = ["train-adapter", str(DEMO_DOC), "--qa", str(qa), "-o", str(out), "--steps", "4", "--rank", "2"]
    line = assert_refused(invoke(capsys, *args, "--model", str(tiny_dir)), (2,))
    assert "diverged at step 2" in line and list(out.parent.iterdir()) == []


# --- the seeded mutation loop -------------------------------------------------------------------------------------

_JUNK = [None, "x", -1, 0, float("nan"), float("inf"), True, [], {"a": 1}, [1.5]]


def _valid_there(key: str, value: object) -> bool:
    """Junk that happens to be a valid value of this key (no targets or layers named: all of them; no dropout)."""
    if value is None:
        return key in ("target_modules", "layers_to_transform")
    return key == "lora_dropout" and type(value) is int and value == 0


def _config_mutation(rng: random.Random, config: dict) -> str:
    key = rng.choice(["r", "lora_alpha", "lora_dropout", "target_modules", "layers_to_transform", "rank_pattern"])
    if key == "r" and rng.random() < 0.5:
        config["r"] = config["r"] + rng.choice([1, 2, 14])
    elif key == "target_modules" and rng.random() < 0.5:
        config["target_modules"] = sorted(config["target_modules"])[: rng.randrange(len(config["target_modules"]))]
    elif key == "layers_to_transform" and rng.random() < 0.5:
        config["layers_to_transform"] = [rng.choice([0, 1])]
    elif key == "rank_pattern":
        config["rank_pattern"] = {rng.choice(config["target_modules"]): config["r"] + 1}
    else:
        config[key] = rng.choice([j for j in _JUNK if not _valid_there(key, j)])
    return f"config {key}={config[key]!r}"


def _meta_mutation(rng: random.Random, meta: dict) -> str:
    choice = rng.randrange(4)
    if choice == 0:
        meta["hyperparameters"]["rank"] = rng.choice([0, 3, 16, "2", None])
        return "meta rank"
    if choice == 1:
        meta["target_modules"] = meta["target_modules"][1:]
        return "meta targets"
    if choice == 2:
        meta["final_loss"] = rng.choice([float("nan"), "low", [], float("inf")])
        return "meta loss"
    meta["base_model"] = rng.choice([[], "x", 3])
    return "meta base_model"


def _weights_mutation(rng: random.Random, folder: Path) -> str:
    path = folder / ADAPTER_WEIGHTS
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    choice = rng.randrange(8)
    if choice == 0:
        path.write_bytes(data[: rng.randrange(len(data))])
        return "truncated"
    if choice == 1:
        path.write_bytes(data + b"\0" * rng.randint(1, 64))
        return "trailing bytes"
    if choice == 2:
        cut = rng.randrange(1, size)
        path.write_bytes(data[: 8 + cut] + b"\xff" + data[9 + cut :])
        return "header byte"
    name_part = rng.choice("AB")

    def change(t: dict[str, torch.Tensor]) -> None:
        name = rng.choice(sorted(k for k in t if f"lora_{name_part}" in k))
        if choice == 3:
            t.pop(name)
        elif choice == 4:
            t[name] = t[name].to(rng.choice([torch.int32, torch.int8, torch.uint8]))
        elif choice == 5:
            t[name] = t[name].flatten() if rng.random() < 0.5 else t[name].T
        elif choice == 6:
            t[name] = t[name].clone()
            t[name].view(-1)[rng.randrange(t[name].numel())] = rng.choice([float("nan"), float("inf")])
        else:
            t[f"base_model.model.extra.{rng.randrange(9)}"] = torch.zeros(2)

    edit_weights(folder, change)
    return f"weights {choice} lora_{name_part}"


def mutate(adapter: Path, where: Path, rng: random.Random) -> tuple[Path, str]:
    folder = copy_of(adapter, where)
    layer = rng.randrange(4)
    label: list[str] = []
    if layer == 0:
        edit_json(folder, ADAPTER_CONFIG, lambda c: label.append(_config_mutation(rng, c)))
        return folder, label[0]
    if layer == 1:
        edit_json(folder, LORAMEM_META, lambda m: label.append(_meta_mutation(rng, m)))
        return folder, label[0]
    if layer == 2:
        name = rng.choice([ADAPTER_CONFIG, LORAMEM_META])
        (folder / name).write_bytes(rng.choice([b"\xff\xfe\x00", b"[1]", b"{", b'"text"', b"1e999"]))
        return folder, f"{name} replaced"
    return folder, _weights_mutation(rng, folder)


def test_mutated_adapters_are_refused(adapter, tmp_path, capsys):
    """Hundreds of seeded mutations through inspect and merge: exit 2 or 3, one line, no traceback, no output."""
    rng = random.Random(13)
    out = tmp_path / "merged"
    for number in range(200):
        folder, label = mutate(adapter, tmp_path, rng)
        command = ["inspect", str(folder)] if number % 2 else ["merge", str(folder), str(adapter), "-o", str(out)]
        try:
            assert_refused(invoke(capsys, *command))
        except AssertionError as exc:
            raise AssertionError(f"{number}: {label}: {exc}") from None
        assert not out.exists(), label


def test_a_mutant_through_the_real_entry_point(adapter, tmp_path):
    bad = copy_of(adapter, tmp_path)
    DEFECTS["header claims 2**62 bytes"](bad)
    result = run_cli("inspect", str(bad))
    assert result.returncode == 2 and len(result.stderr.decode().strip().splitlines()) == 1, result.stderr
