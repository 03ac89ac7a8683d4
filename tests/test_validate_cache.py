"""A cache that is valid safetensors but wrong inside is refused before any use (issue 13, defects 3 and 8),
and a seeded mutation loop over real caches finds nothing that is accepted, crashes or writes output."""

from __future__ import annotations

import json
import random
import struct
import time
from collections.abc import Callable

import pytest
import torch
from conftest import run_cli
from inprocess import assert_refused, invoke

from loramem import KVCache, compress, encode
from loramem.kv.compress import stored_as
from loramem.kv.quantize import make_storage
from loramem.kv.value_groups import compress_value_groups


def split(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load

    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    return load(data), json.loads(header["__metadata__"]["loramem"])


def join(tensors: dict[str, torch.Tensor], meta, raw_meta: str | None = None) -> bytes:
    from safetensors.torch import save

    text = raw_meta if raw_meta is not None else json.dumps(meta)
    return save(
        {k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "loramem.kvcache", "loramem": text}
    )


@pytest.fixture(scope="module")
def caches(tiny, doc_text) -> dict[str, bytes]:
    """A plain encoding, a token-compressed one, an int8 one and an int4 value-group one."""
    plain = encode(tiny, doc_text, presses=["knorm", "snapkv"])
    groups = compress_value_groups(plain, "knorm", 4, 0.5)
    return {
        "plain": plain.to_bytes(),
        "compressed": compress(plain, "knorm", ratio=0.5).to_bytes(),
        "int8": stored_as(compress(plain, "knorm", ratio=0.3), make_storage("int8", "channel")).to_bytes(),
        "groups": stored_as(groups, make_storage("int4")).to_bytes(),
    }


def edit(data: bytes, change: Callable[[dict[str, torch.Tensor], dict], object]) -> bytes:
    tensors, meta = split(data)
    result = change(tensors, meta)
    return join(tensors, result[1] if isinstance(result, tuple) and result[0] == "meta" else meta)


# Each defect that issue 13 reports for caches, as one edit of a real cache.
DEFECTS: dict[str, Callable[[dict[str, torch.Tensor], dict], object]] = {
    "int32 keys": lambda t, m: t.update({"layers.1.keys": t["layers.1.keys"].to(torch.int32)}),
    "int32 values": lambda t, m: t.update({"layers.0.values": t["layers.0.values"].to(torch.int32)}),
    "token ids cut to 40": lambda t, m: t.update(token_ids=t["token_ids"][:40]),
    "positions out of range": lambda t, m: t["layers.0.positions"].__setitem__((0, -1), m["n_tokens"] + 5),
    "positions unsorted": lambda t, m: t.update({"layers.1.positions": t["layers.1.positions"].flip(-1).contiguous()}),
    "negative n_protected": lambda t, m: m.update(n_protected=-3),
    "NaN scores": lambda t, m: t["scores.knorm"].__setitem__((0, 0, 5), float("nan")),
    "inf keys": lambda t, m: t["layers.0.keys"].__setitem__((0, 0, 0), float("inf")),
    "keys shorter than values": lambda t, m: t.update({"layers.0.keys": t["layers.0.keys"][:, :-4]}),
    "metadata not an object": lambda t, m: ("meta", [1, 2]),
    "n_layers as text": lambda t, m: m.update(n_layers="2"),
    "missing model": lambda t, m: m.pop("model"),
    "missing framing": lambda t, m: m.pop("framing"),
    "framing not strings": lambda t, m: m["framing"].update(prefix=7),
    "1-D keys": lambda t, m: t.update({"layers.0.keys": t["layers.0.keys"].flatten()}),
    "wrong head dim": lambda t, m: m.update(head_dim=8),
    "wrong KV heads": lambda t, m: m.update(n_kv_heads=1),
    "missing positions": lambda t, m: t.pop("layers.1.positions"),
    "extra tensor": lambda t, m: t.update(bogus=torch.zeros(3)),
    "format_version as text": lambda t, m: m.update(format_version="1"),
    "unknown storage": lambda t, m: m.update(storage={"dtype": "int9"}),
    "storage with extra keys": lambda t, m: m.update(storage={"dtype": "native", "zip": 1}),
    "dtype not a model dtype": lambda t, m: m.update(dtype="complex64"),
    "n_tokens huge": lambda t, m: m.update(n_tokens=2**40),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_defective_cache_is_refused_by_inspect_compress_and_ask(caches, tmp_path, capsys, defect):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(edit(caches["plain"], DEFECTS[defect]))
    line = assert_refused(invoke(capsys, "inspect", str(bad)), (2,))
    assert "not a valid loramem cache" in line
    out = tmp_path / "out.safetensors"
    assert_refused(invoke(capsys, "compress", str(bad), "--press", "knorm", "--ratio", "0.5", "-o", str(out)), (2,))
    assert_refused(invoke(capsys, "ask", "--cache", str(bad), "Who?", "--max-new-tokens", "2"), (2,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_message_names_layer_and_dtypes(caches):
    from loramem import LoramemError

    with pytest.raises(LoramemError, match=r"not a valid loramem cache: layer 1 keys are int32, expected float32"):
        KVCache.from_bytes(edit(caches["plain"], DEFECTS["int32 keys"]), "c.safetensors")


def test_valid_variants_load(caches):
    for name, data in caches.items():
        cache = KVCache.from_bytes(data, name)
        assert cache.n_layers == 2, name


def test_future_format_version_is_incompatible(caches, tmp_path, capsys):
    bad = tmp_path / "future.safetensors"
    bad.write_bytes(edit(caches["plain"], lambda t, m: m.update(format_version=2)))
    assert "version 2" in assert_refused(invoke(capsys, "inspect", str(bad)), (3,))


def test_scores_from_another_model_is_incompatible(caches, other_tiny_dir, doc_text, tmp_path, capsys):
    from loramem import load_model

    other = tmp_path / "other.safetensors"
    other.write_bytes(encode(load_model(str(other_tiny_dir)), doc_text, presses=["knorm"]).to_bytes())
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(caches["plain"])
    out = tmp_path / "out.safetensors"
    args = ("compress", str(mine), "--press", "knorm", "--ratio", "0.5", "--scores-from", str(other), "-o", str(out))
    assert "another base model" in assert_refused(invoke(capsys, *args), (3,))
    assert not out.exists()


def test_devices_are_refused_at_once(capsys):
    started = time.perf_counter()
    assert "not a regular file" in assert_refused(invoke(capsys, "inspect", "/dev/zero"), (2,))
    with open("/dev/zero", "rb") as zeros:  # an endless stdin: the header is read first, and refused
        assert_refused(invoke_with_stdin(capsys, zeros, "inspect", "-"), (2,))
    assert time.perf_counter() - started < 60  # an endless stream would never end: any bound shows it refused
    result = run_cli("inspect", "/dev/zero")
    assert result.returncode == 2 and b"not a regular file" in result.stderr


def test_header_claiming_huge_data_is_refused(caches, tmp_path, capsys):
    header = json.dumps({"x": {"dtype": "F32", "shape": [2**60], "data_offsets": [0, 2**62]}}).encode()
    bad = tmp_path / "huge.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    assert_refused(invoke(capsys, "inspect", str(bad)), (2,))


def invoke_with_stdin(capsys: pytest.CaptureFixture, stream, *args: str):
    """`invoke` with `stream` as stdin."""
    import io
    import sys

    saved = sys.stdin
    sys.stdin = io.TextIOWrapper(stream)
    try:
        return invoke(capsys, *args)
    finally:
        sys.stdin.detach()
        sys.stdin = saved


# --- the seeded mutation loop -------------------------------------------------------------------------------------

_JUNK = [None, "x", "", -1, 0, 10**12, 1.5, float("nan"), True, [], {}, [1], {"a": 1}]


def _meta_mutation(rng: random.Random, tensors: dict, meta: dict, protected: set[str]) -> str:
    """A metadata edit that is wrong whatever the cache: a wrong type, a wrong count, a field removed."""
    key = rng.choice(sorted(protected))
    choice = rng.randrange(4)
    if choice == 0:
        meta.pop(key)
        return f"drop {key}"
    if choice == 1 and type(meta[key]) is int:
        meta[key] = (
            meta[key] + rng.choice([-(10**9), 1, 7, 10**9]) if key != "format_version" else 1 + rng.randrange(1, 9)
        )
        return f"{key} off"
    value = rng.choice([j for j in _JUNK if type(j) is not type(meta[key])])
    meta[key] = value
    return f"{key}={value!r}"


def _tensor_mutation(rng: random.Random, tensors: dict, meta: dict) -> str:
    """A tensor edit that breaks a rule: dropped, recast, reshaped, non-finite, out of order or unknown."""
    names = sorted(tensors)
    name = rng.choice(names)
    t = tensors[name]
    choice = rng.randrange(7)
    if choice == 0 and not name.startswith("scores."):
        tensors.pop(name)
        return f"drop {name}"
    if choice == 1:
        dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.int8, torch.uint8]
        tensors[name] = t.to(rng.choice([d for d in dtypes if d != t.dtype]))
        return f"cast {name}"
    if choice == 2 and t.dim() and t.shape[-1] > 1:
        tensors[name] = t[..., : t.shape[-1] - rng.randint(1, t.shape[-1] - 1)]
        return f"cut {name}"
    if choice == 3:
        tensors[name] = t.flatten() if t.dim() > 1 else t[None, :]
        return f"reshape {name}"
    if choice == 4 and t.is_floating_point() and t.numel():
        flat = t.flatten().clone()
        flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
        tensors[name] = flat.reshape(t.shape)
        return f"non-finite in {name}"
    if choice == 5 and name.endswith("positions") and t.shape[-1] > 1:
        p = t.clone()
        i = rng.randrange(1, t.shape[-1])
        h = rng.randrange(t.shape[0])
        p[h, i] = rng.choice([p[h, i - 1], -1, meta["n_tokens"] + rng.randrange(5)])
        tensors[name] = p
        return f"positions of {name}"
    tensors[f"extra.{rng.randrange(99)}"] = torch.zeros(rng.randrange(1, 4))
    return "unknown tensor"


def _byte_mutation(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Byte-level damage that no valid file survives: cut short, extended, or a broken header."""
    (size,) = struct.unpack("<Q", data[:8])
    choice = rng.randrange(5)
    if choice == 4:
        return _header_entry_mutation(rng, data, size)
    if choice == 0:
        return data[: rng.randrange(len(data))], "truncated"
    if choice == 1:
        return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))), "trailing bytes"
    if choice == 2:
        return struct.pack("<Q", rng.choice([0, size + 1 + rng.randrange(1000), 2**63])) + data[8:], "header length"
    cut = rng.randrange(1, size)
    return data[:8] + data[8 : 8 + cut] + b"\xff" + data[9 + cut :], "header byte"


def _header_entry_mutation(rng: random.Random, data: bytes, size: int) -> tuple[bytes, str]:
    """One tensor's header entry rewritten over the same data: another dtype, shape or offsets."""
    header = json.loads(data[8 : 8 + size])
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[name]
    field = rng.choice(["dtype", "shape", "data_offsets"])
    if field == "dtype":
        entry["dtype"] = rng.choice(
            [d for d in ("F32", "F16", "BF16", "I32", "I8", "U8", "F64", "Q4") if d != entry["dtype"]]
        )
    elif field == "shape":
        entry["shape"] = rng.choice([[*entry["shape"], 1], [*entry["shape"][::-1], 2], [-1], "3", []])
    else:
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[begin, end + 4], [begin + 4, end], [end, begin], [begin]])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + size :], f"header {field} of {name}"


_REQUIRED = {
    "format_version",
    "n_tokens",
    "n_layers",
    "n_kv_heads",
    "head_dim",
    "dtype",
    "model",
    "framing",
    "document",
}


def mutants(caches: dict[str, bytes], n: int, seed: int = 13) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    out = []
    for number in range(n):
        kind = rng.choice(sorted(caches))
        data = caches[kind]
        tensors, meta = split(data)
        layer = rng.randrange(3)
        if layer == 0:
            what = _meta_mutation(rng, tensors, meta, _REQUIRED)
            mutated = join(tensors, meta)
        elif layer == 1:
            what = _tensor_mutation(rng, tensors, meta)
            mutated = join(tensors, meta)
        else:
            mutated, what = _byte_mutation(rng, data)
        out.append((f"{number}: {kind}: {what}", mutated))
    return out


def test_mutated_caches_are_refused(caches, tmp_path, capsys):
    """Hundreds of seeded mutations through inspect and compress: exit 2 or 3, one line, no traceback, no output."""
    cases = mutants(caches, 300)
    bad, out = tmp_path / "bad.safetensors", tmp_path / "out.safetensors"
    for label, data in cases:
        bad.write_bytes(data)
        command = ["inspect", str(bad)] if len(label) % 2 else ["compress", str(bad), "-p", "knorm", "-r", "0.5"]
        result = invoke(capsys, *command, *(["-o", str(out)] if command[0] == "compress" else []))
        try:
            assert_refused(result)
        except AssertionError as exc:
            raise AssertionError(f"{label}: {exc}") from None
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"], label


def test_some_mutants_through_the_real_entry_point(caches, tmp_path):
    for label, data in mutants(caches, 4, seed=7):
        result = run_cli("inspect", "-", input=data)
        assert result.returncode in (2, 3), (label, result.stderr)
        assert len(result.stderr.decode().strip().splitlines()) == 1, (label, result.stderr)


def _one_layer(t: dict[str, torch.Tensor], m: dict) -> None:
    for name in [n for n in t if n.startswith("layers.1.")]:
        t.pop(name)
    t["scores.knorm"] = t["scores.knorm"][:1].contiguous()
    t["scores.snapkv"] = t["scores.snapkv"][:1].contiguous()
    m["n_layers"] = 1


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        (_one_layer, 2, "n_layers is 1, but the model it names has 2"),
        (lambda t, m: m.update(n_protected=0), 2, "framing prefix"),
        (lambda t, m: m["framing"].update(suffix="Answer:"), 3, "frames the document differently"),
    ],
)
def test_cache_that_does_not_fit_its_model_is_refused_by_ask(caches, tiny_dir, tmp_path, capsys, change, code, message):
    """Self-consistent, but not what the model it names makes: refused before anything is generated."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(edit(caches["plain"], change))
    result = invoke(capsys, "ask", "--cache", str(bad), "Who?", "--max-new-tokens", "2", "--model", str(tiny_dir))
    assert message in assert_refused(result, (code,))
