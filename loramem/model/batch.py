"""Batched greedy decoding over one shared document cache, in a pre-sized cache.

Every row of a batch is one question over a stored document cache: one cache shared by every row, or each
row its own (an eval's cells of one document differ only in what their caches kept). Each layer's buffer holds
each row's kept keys/values (copied once), zero-padded to the longest row's, then room for the longest question
and the answer, so decoding writes each new token in place instead of growing a cache by concatenation.

Questions are left-padded: row b's real question tokens take the last `len_b` columns of the
question block, at positions `n_tokens .. n_tokens + len_b - 1` (its document's original length,
whatever was evicted), and its answer continues from there; every decoding step then writes all rows
at one column. A boolean mask per layer says what each query may attend to: the document tokens its
row's KV head kept (value-group caches keep different tokens per head; a row whose cache kept fewer tokens than
the longest row's never sees the padding), the row's own non-pad question and
answer tokens up to itself (a pad column attends only to itself so its states stay finite), and, on
sliding-window layers, keys whose original position lies within the window. Attention runs with the
query heads of a KV group stacked as rows (no repeated keys), in `torch.nn.functional.scaled_dot_product_attention`
(or in plain math for models that soft-cap attention logits).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

ATTENTION = "loramem_batched"
_ACTIVE: ContextVar[PresizedCache | None] = ContextVar("loramem_batch_cache", default=None)


@dataclass
class Decoded:
    """One row's greedy tokens, whether it ended on a stop token, and when it finished."""

    tokens: list[int]
    stopped: bool
    prompt_tokens: int
    prefill_seconds: float  # the batch's question pass alone
    first_token_seconds: float  # from the call: the stored cache put on the device, the question pass, the argmax
    decode_seconds: float  # from the first token to this row's last


def clock(device: Any) -> float:
    """perf_counter once the device has finished its queued work (CUDA runs asynchronously)."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Grouped-query attention under the active cache's mask for this layer (the model's own mask is unused)."""
    cache = _ACTIVE.get()
    assert cache is not None, "the batched attention runs only inside PresizedCache.active()"
    mask = cache.layers[module.layer_idx].mask
    b, n_q, q_len, d = query.shape
    n_kv = key.shape[1]
    rep = n_q // n_kv
    grouped = query.reshape(b, n_kv, rep * q_len, d)  # query head h * rep + r reads KV head h
    if q_len > 1:
        mask = mask[:, :, None].expand(-1, -1, rep, -1, -1).reshape(b, mask.shape[1], rep * q_len, -1)
    if softcap is None:
        out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    else:
        scores = grouped @ key.transpose(-1, -2) * (scaling if scaling is not None else d**-0.5)
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype) @ value
    return out.reshape(b, n_q, q_len, -1).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, _attention)


class PresizedLayer:
    """One layer's keys/values for the whole batch: the document, then question and answer columns written in place."""

    is_sliding = False
    is_compileable = False

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        doc_positions: torch.Tensor,
        present: torch.Tensor | None,
        room: int,
        window: int | None,
    ) -> None:
        batch, n_kv, n_doc, _ = keys.shape
        self.n_doc = n_doc
        self.keys = keys.new_empty(batch, n_kv, n_doc + room, keys.shape[-1])
        self.values = values.new_empty(batch, n_kv, n_doc + room, values.shape[-1])
        self.keys[:, :, :n_doc] = keys
        self.values[:, :, :n_doc] = values
        self.filled = n_doc
        self.doc_positions = doc_positions  # [1 or B, H, n_doc] original positions of the kept tokens
        self.present = present  # [1 or B, H, n_doc] tokens each row's head kept (value groups, padding), None: all
        self.window = window
        self.mask: torch.Tensor | None = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        step = key_states.shape[2]
        self.keys[:, :, self.filled : self.filled + step] = key_states
        self.values[:, :, self.filled : self.filled + step] = value_states
        self.filled += step
        return self.keys[:, :, : self.filled], self.values[:, :, : self.filled]

    def get_seq_length(self) -> int:
        return self.filled

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.filled + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return int(self.keys.shape[2])


class PresizedCache:
    """The transformers Cache interface over `PresizedLayer`s, with the masks for the next forward pass."""

    def __init__(self, layers: list[PresizedLayer], new_positions: torch.Tensor, new_valid: torch.Tensor) -> None:
        self.layers = layers
        self.new_positions = new_positions  # [B, room] original position of each question/answer column
        self.new_valid = new_valid  # [B, room] False on left padding
        self.offset = 0  # question/answer columns written so far

    # --- the subset of transformers.Cache that decoder models call ---
    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_compileable(self) -> bool:
        return False

    def __len__(self) -> int:
        return len(self.layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any) -> tuple:
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def get_mask_sizes(self, cache_position: torch.Tensor, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(cache_position)

    # --- masks ---
    def prepare(self, q_len: int) -> None:
        """Masks for the next `q_len` columns of every layer; layers alike share one."""
        new = slice(self.offset, self.offset + q_len)
        q_pos = self.new_positions[:, new]  # [B, q]
        cols = torch.arange(self.offset + q_len, device=q_pos.device)
        rows = cols[self.offset :]
        own = cols[None, :] == rows[:, None]
        new_allowed = (self.new_valid[:, None, : self.offset + q_len] & (cols[None, :] <= rows[:, None])[None]) | own
        built: dict[tuple, torch.Tensor] = {}
        for layer in self.layers:
            key = (layer.n_doc, id(layer.present), id(layer.doc_positions) if layer.window else None, layer.window)
            if key not in built:
                built[key] = self._mask(layer, q_pos, new_allowed)
            layer.mask = built[key]
        self.offset += q_len

    def _mask(self, layer: PresizedLayer, q_pos: torch.Tensor, new_allowed: torch.Tensor) -> torch.Tensor:
        """[B, H or 1, q, kv] True where a query may attend a key."""
        b, q_len = q_pos.shape
        new = new_allowed[:, None]  # [B, 1, q, new]
        doc = torch.ones(b, 1, q_len, layer.n_doc, dtype=torch.bool, device=q_pos.device)
        if layer.present is not None:
            doc = doc & layer.present[:, :, None, :]
        if layer.window:
            new_pos = self.new_positions[:, : self.offset + q_len]
            new = new & (q_pos[:, None, :, None] - new_pos[:, None, None, :] < layer.window)
            doc = doc & (q_pos[:, None, :, None] - layer.doc_positions[:, :, None, :] < layer.window)
        heads = max(doc.shape[1], new.shape[1])
        return torch.cat([doc.expand(b, heads, q_len, -1), new.expand(b, heads, q_len, -1)], dim=-1)

    @contextmanager
    def active(self, model: Any) -> Iterator[None]:
        """Run the model with the batched attention reading this cache's masks."""
        _register()
        before = model.config._attn_implementation
        token = _ACTIVE.set(self)
        model.set_attn_implementation(ATTENTION)
        try:
            yield
        finally:
            model.set_attn_implementation(before)
            _ACTIVE.reset(token)


def _decoder_attentions(model: Any) -> list[Any]:
    inner = model.model
    layers = inner.language_model.layers if hasattr(inner, "language_model") else inner.layers
    return [layer.self_attn for layer in layers]


def _shared(seen: list[torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
    """An equal tensor met before (same object, so masks built for it are reused), else this one."""
    for other in seen:
        if other.dtype == tensor.dtype and other.shape == tensor.shape and torch.equal(other, tensor):
            return other
    seen.append(tensor)
    return tensor


def _row_caches(cache: Any, rows: int) -> list[Any]:
    """One cache per row: `cache` is a KVCache or None shared by every row, or a list of them, one per row."""
    if isinstance(cache, list | tuple):
        if len(cache) != rows:
            raise ValueError(f"{len(cache)} caches for {rows} rows")
        return list(cache)
    return [cache] * rows


def _layer_doc(
    caches: list[Any], index: int, n_kv: int, head_dim: int, device: Any, dtype: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One layer's document part for every row: keys, values [1 or B, H, n, D], kept positions and kept mask
    [1 or B, H, n] (None: every row keeps all n). Rows sharing a cache share its copy; shorter rows are zero-padded
    (zeros, not garbage: a masked key must still give a finite score) and masked."""
    distinct = {id(c): c for c in caches if c is not None and c.kept_per_layer[index] > 0}
    kept = {key: c.kept_per_layer[index] for key, c in distinct.items()}
    n_doc = max(kept.values(), default=0)
    if not distinct:
        empty = torch.zeros(1, n_kv, 0, head_dim, device=device, dtype=dtype)
        return empty, empty, torch.zeros(1, n_kv, 0, dtype=torch.long, device=device), None
    if len(distinct) == 1 and all(c is not None and id(c) in distinct for c in caches):
        # the one-document case: one copy, broadcast to every row when the buffer is filled
        (only,) = distinct.values()
        present = only.masks[index].any(-1)[None].to(device) if only.masks is not None else None
        return (
            only.keys[index][None].to(device, dtype),
            only.values[index][None].to(device, dtype),
            only.positions[index][None].to(device),
            present,
        )
    rows = len(caches)
    values_dim = next(iter(distinct.values())).values[index].shape[-1]
    keys = torch.zeros(rows, n_kv, n_doc, head_dim, device=device, dtype=dtype)
    values = torch.zeros(rows, n_kv, n_doc, values_dim, device=device, dtype=dtype)
    positions = torch.zeros(rows, n_kv, n_doc, dtype=torch.long, device=device)
    present = torch.zeros(rows, n_kv, n_doc, dtype=torch.bool, device=device)
    for key, c in distinct.items():
        mine = torch.tensor([row for row, other in enumerate(caches) if id(other) == key], device=device)
        n = kept[key]
        keys[mine, :, :n] = c.keys[index].to(device, dtype)
        values[mine, :, :n] = c.values[index].to(device, dtype)
        positions[mine, :, :n] = c.positions[index].to(device, torch.long)
        present[mine, :, :n] = c.masks[index].any(-1).to(device) if c.masks is not None else True
    return keys, values, positions, present


def build_cache(model: Any, cache: Any, prompts: list[list[int]], room: int, device: Any, dtype: Any) -> PresizedCache:
    """A pre-sized batch cache for left-padded `prompts` over `cache`: a KVCache or None (no document) shared by
    every row, or a list with one per row."""
    width = max(len(p) for p in prompts)
    caches = _row_caches(cache, len(prompts))
    starts = torch.tensor([c.n_tokens if c is not None else 0 for c in caches], device=device)
    pads = torch.tensor([width - len(p) for p in prompts], device=device)
    column = torch.arange(room, device=device)
    new_positions = starts[:, None] + column[None, :] - pads[:, None]
    new_valid = column[None, :] >= pads[:, None]
    config = model.config
    n_kv = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = []
    seen: list[torch.Tensor] = []
    for index, attn in enumerate(_decoder_attentions(model)):
        window = getattr(attn, "sliding_window", None)
        keys, values, positions, present = _layer_doc(caches, index, n_kv, head_dim, device, dtype)
        # layers with equal kept positions share one tensor, so they share one mask per step
        positions = _shared(seen, positions)
        present = None if present is None else _shared(seen, present)
        keys, values = keys.expand(len(prompts), -1, -1, -1), values.expand(len(prompts), -1, -1, -1)
        layers.append(PresizedLayer(keys, values, positions, present, room, window))
    return PresizedCache(layers, new_positions, new_valid)


def decode(
    model: Any,
    prompts: list[list[int]],
    cache: Any,
    stops: set[int],
    max_new_tokens: int,
    pad_id: int,
) -> list[Decoded]:
    """Greedy tokens for each prompt over `cache` (one shared, or a list with one per prompt), each row stopping at
    its own stop token."""
    device, dtype = model.device, model.dtype
    started = clock(device)  # time to first token counts putting the stored cache on the device
    width = max(len(p) for p in prompts)
    room = width + max_new_tokens
    batch = build_cache(model, cache, prompts, room, device, dtype)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    rows = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    stopped = [False] * rows
    finished = [0.0] * rows
    with torch.inference_mode(), batch.active(model):
        batch.prepare(width)
        prefill_started = clock(device)
        out = model(
            input_ids=ids,
            past_key_values=batch,
            position_ids=batch.new_positions[:, :width],
            cache_position=torch.arange(width, device=device),
            use_cache=True,
            logits_to_keep=1,
        )
        prefilled = clock(device)
        next_ids = out.logits[:, -1].argmax(-1).tolist()
        first = clock(device)
        step = 0
        while True:
            for row, token in enumerate(next_ids):
                if stopped[row] or len(tokens[row]) >= max_new_tokens:
                    continue
                if token in stops:
                    stopped[row], finished[row] = True, time.perf_counter()
                else:
                    tokens[row].append(token)
                    finished[row] = time.perf_counter()
            if all(s or len(t) >= max_new_tokens for s, t in zip(stopped, tokens)):
                break
            column = width + step
            batch.prepare(1)
            out = model(
                input_ids=torch.tensor(next_ids, device=device)[:, None],
                past_key_values=batch,
                position_ids=batch.new_positions[:, column : column + 1],
                cache_position=torch.tensor([column], device=device),
                use_cache=True,
            )
            next_ids = out.logits[:, -1].argmax(-1).tolist()
            step += 1
    return [
        Decoded(
            tokens[row],
            stopped[row],
            len(prompts[row]),
            prefilled - prefill_started,
            first - started,
            max(finished[row] - first, 0.0),
        )
        for row in range(rows)
    ]
