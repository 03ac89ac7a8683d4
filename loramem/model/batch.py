"""Batched greedy decoding over stored document caches, in a pre-sized cache.

Every row of a batch is one question over a stored document cache: one cache shared by every row, or each
row its own (an eval's cells of one document differ only in what their caches kept). Each layer holds the
documents' kept keys/values: one copy when every row shares the document (each step then reads it once, whatever
the batch size), else each row's, zero-padded to the longest row's. Then per row room for the longest question and
the answer, so decoding writes each new token in place instead of growing a cache by concatenation.

Questions are left-padded: row b's real question tokens take the last `len_b` columns of the
question block, at positions `n_tokens .. n_tokens + len_b - 1` (its document's original length,
whatever was evicted), and its answer continues from there; every decoding step then writes all rows
at one column. Boolean masks, built once per batch for every column, say what each query may attend to: the
document tokens its row's KV head kept (value-group caches keep different tokens per head; a row whose cache kept
fewer tokens than the longest row's never sees the padding), the row's own non-pad question and answer tokens up
to itself (a pad column attends only to itself so its states stay finite), and, on sliding-window layers, keys
whose original position lies within the window (the attention itself: `loramem.model.attention`). Leading
tokens that every question over a shared document begins with (the instruction; a closed-book chat prefix) are
computed once, in a one-row pass, and held with the document.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from loramem.model.attention import ACTIVE, ATTENTION, register
from loramem.model.prompt import common_prefix

# Rows that finished leave the batch: at once when the rows share one document (a retirement then copies only their
# own question and answer columns), else once at most this share of it is still running (each retirement copies the
# running rows' document copies, about what one step reads, so it is not done for every finished row).
RETIRE_AT = 0.75


@dataclass
class Decoded:
    """One row's greedy tokens, whether it ended on a stop token, and when it finished."""

    tokens: list[int]
    stopped: bool
    prompt_tokens: int
    prefill_seconds: float  # the questions' passes (the shared leading tokens' included)
    first_token_seconds: float  # from the call: the stored cache put on the device, the question pass, the argmax
    decode_seconds: float  # from the first token to this row's last


def clock(device: Any) -> float:
    """perf_counter once the device has finished its queued work (CUDA runs asynchronously)."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


class PresizedLayer:
    """One layer: the document's keys/values, once for all rows, then each row's question and answer columns,
    written in place."""

    is_sliding = False
    is_compileable = False

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        doc_positions: torch.Tensor,
        present: torch.Tensor | None,
        batch: int,
        room: int,
        window: int | None,
    ) -> None:
        _, n_kv, n_doc, _ = keys.shape
        self.n_doc = n_doc
        self.doc_keys = keys  # [1 (shared by every row) or B, H, n_doc, d]
        self.doc_values = values
        self.keys = keys.new_zeros(batch, n_kv, room, keys.shape[-1])
        self.values = values.new_zeros(batch, n_kv, room, values.shape[-1])
        self.filled = 0
        self.doc_positions = doc_positions  # [1 or B, H, n_doc] original positions of the kept tokens
        self.present = present  # [1 or B, H, n_doc] tokens each row's head kept (value groups, padding), None: all
        self.window = window
        self.group = 0  # index of the layers that share this one's masks
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        step = key_states.shape[2]
        self.keys[:, :, self.filled : self.filled + step] = key_states
        self.values[:, :, self.filled : self.filled + step] = value_states
        self.filled += step
        return self.keys[:, :, : self.filled], self.values[:, :, : self.filled]

    def get_seq_length(self) -> int:
        return self.n_doc + self.filled

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.n_doc + self.filled + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return self.n_doc + int(self.keys.shape[2])


class PresizedCache:
    """The transformers Cache interface over `PresizedLayer`s, with every column's masks built once per batch."""

    def __init__(self, layers: list[PresizedLayer], new_positions: torch.Tensor, new_valid: torch.Tensor) -> None:
        self.layers = layers
        self.new_positions = new_positions  # [B, room] original position of each question/answer column
        self.new_valid = new_valid  # [B, room] False on left padding
        self.offset = 0  # question/answer columns written so far
        groups: dict[tuple, int] = {}
        self.masks: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        for layer in layers:
            key = (layer.n_doc, id(layer.present), id(layer.doc_positions) if layer.window else None, layer.window)
            if key not in groups:
                groups[key] = len(self.masks)
                self.masks.append(self._blocked(layer))
            layer.group = groups[key]
        self.blocked: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # the next pass's slices (`prepare`)

    @property
    def shares_document(self) -> bool:
        """Every row reads one copy of the document (a retirement copies only the rows' own columns)."""
        return all(layer.doc_keys.shape[0] == 1 for layer in self.layers)

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

    def retain(self, rows: list[int]) -> None:
        """Keep only these rows of the batch (a copy of their part of every buffer); tensors shared by layers stay
        shared, so layers alike still share one mask."""
        index = torch.tensor(rows, device=self.new_positions.device)
        self.new_positions, self.new_valid = self.new_positions[index], self.new_valid[index]
        taken: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (old, new): the old kept alive, ids unique

        def take(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.shape[0] == 1:  # one for every row
                return tensor
            if id(tensor) not in taken:
                taken[id(tensor)] = (tensor, tensor[index])
            return taken[id(tensor)][1]

        for layer in self.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
            layer.doc_keys, layer.doc_values = take(layer.doc_keys), take(layer.doc_values)
            layer.doc_positions = take(layer.doc_positions)
            layer.present = None if layer.present is None else take(layer.present)
        self.masks = [(None if doc is None else take(doc), take(new)) for doc, new in self.masks]

    # --- masks ---
    def prepare(self, q_len: int) -> None:
        """Point every layer group at its masks for the next `q_len` columns (slices of masks built once)."""
        rows, keys = slice(self.offset, self.offset + q_len), self.offset + q_len
        self.blocked = [(None if doc is None else doc[..., rows, :], new[..., rows, :keys]) for doc, new in self.masks]
        self.offset += q_len

    def _blocked(self, layer: PresizedLayer) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Where each question/answer column may NOT attend, for every column at once: over the document
        ([B or 1, H or 1, 1, room, n_doc], None if nothing is blocked) and over the new columns ([B, 1, 1, room, room]).

        Allowed: the document tokens the query's KV head kept, the row's own non-pad columns up to itself (a pad
        column attends only to itself so its states stay finite), and on sliding-window layers keys whose
        original position lies within the window."""
        pos = self.new_positions  # [B, room]
        cols = torch.arange(pos.shape[1], device=pos.device)
        causal = cols[None, :] <= cols[:, None]
        new = (self.new_valid[:, None, :] & causal[None]) | torch.eye(len(cols), dtype=torch.bool, device=pos.device)
        doc: torch.Tensor | None = None
        if layer.present is not None:
            doc = layer.present[:, :, None, :].expand(-1, -1, len(cols), -1)  # [1 or B, H, room, n_doc]
        if layer.window:
            new = new & (pos[:, :, None] - pos[:, None, :] < layer.window)
            near = pos[:, None, :, None] - layer.doc_positions[:, :, None, :] < layer.window  # [B, H, room, n_doc]
            doc = near if doc is None else doc & near
        return (None if doc is None else ~doc[:, :, None]), ~new[:, None, None]

    @contextmanager
    def active(self, model: Any) -> Iterator[None]:
        """Run the model with the batched attention reading this cache's masks (a transformers model is switched to
        it for the block; `loramem.model.lean`'s calls it already)."""
        token = ACTIVE.set(self)
        switch = not getattr(model, "uses_batched_attention", False)
        if switch:
            register()
            before = model.config._attn_implementation
            model.set_attn_implementation(ATTENTION)
        try:
            yield
        finally:
            if switch:
                model.set_attn_implementation(before)
            ACTIVE.reset(token)


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


Doc = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # keys, values, positions, present


def _documents(model: Any, caches: list[Any], device: Any, dtype: Any) -> list[Doc]:
    """Each layer's document part for these rows (`_layer_doc`)."""
    config = model.config
    n_kv = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = len(_decoder_attentions(model))
    return [_layer_doc(caches, index, n_kv, head_dim, device, dtype) for index in range(layers)]


def _assemble(model: Any, docs: list[Doc], prompts: list[list[int]], starts: torch.Tensor, room: int) -> PresizedCache:
    """A pre-sized cache over each layer's document part for left-padded `prompts`, row b's first prompt token at
    original position starts[b]."""
    width = max(len(p) for p in prompts)
    device = starts.device
    pads = torch.tensor([width - len(p) for p in prompts], device=device)
    column = torch.arange(room, device=device)
    new_positions = starts[:, None] + column[None, :] - pads[:, None]
    new_valid = column[None, :] >= pads[:, None]
    layers = []
    seen: list[torch.Tensor] = []
    for attn, (keys, values, positions, present) in zip(_decoder_attentions(model), docs):
        window = getattr(attn, "sliding_window", None)
        # layers with equal kept positions share one tensor, so they share one mask per step
        positions = _shared(seen, positions)
        present = None if present is None else _shared(seen, present)
        layers.append(PresizedLayer(keys, values, positions, present, len(prompts), room, window))
    return PresizedCache(layers, new_positions, new_valid)


def _row_documents(model: Any, cache: Any, rows: int, device: Any, dtype: Any) -> tuple[list[Doc], torch.Tensor]:
    """Each layer's document part for `rows` rows over `cache` (`_row_caches`), and the original position where
    each row's own tokens start (its document's length)."""
    caches = _row_caches(cache, rows)
    starts = torch.tensor([c.n_tokens if c is not None else 0 for c in caches], device=device)
    return _documents(model, caches, device, dtype), starts


def build_cache(model: Any, cache: Any, prompts: list[list[int]], room: int, device: Any, dtype: Any) -> PresizedCache:
    """A pre-sized batch cache for left-padded `prompts` over `cache`: a KVCache or None (no document) shared by
    every row, or a list with one per row."""
    docs, starts = _row_documents(model, cache, len(prompts), device, dtype)
    return _assemble(model, docs, prompts, starts, room)


def one_cache(caches: list[Any]) -> bool:
    """Every row reads the same cache (or every row none): the engine then holds one copy of it."""
    return all(c is caches[0] for c in caches)


def shared_lead(prompts: list[list[int]], cache: Any) -> int:
    """How many leading tokens every prompt shares, when every row reads one document (or none): those are computed
    once and held with the document. At least one token of each prompt is left to the batch's own pass."""
    if len(prompts) < 2 or not one_cache(_row_caches(cache, len(prompts))):
        return 0
    return common_prefix(prompts, min(len(p) for p in prompts) - 1)


def _lead_document(
    model: Any, cache: Any, lead: list[int], rows: int, device: Any, dtype: Any
) -> tuple[list[Doc], torch.Tensor]:
    """The rows' one document extended by their shared leading tokens, computed in a one-row pass; and the original
    position where each row's own tokens start."""
    first = _row_caches(cache, rows)[0]
    docs, start = _row_documents(model, first, 1, device, dtype)
    one = _assemble(model, docs, [lead], start, len(lead))
    with one.active(model):
        one.prepare(len(lead))
        model(
            input_ids=torch.tensor([lead], device=device),
            past_key_values=one,
            position_ids=one.new_positions,
            cache_position=torch.arange(len(lead), device=device),
            use_cache=True,
            logits_to_keep=1,
        )
    extended = []
    for (keys, values, positions, present), layer in zip(docs, one.layers):
        heads = keys.shape[1]
        extended.append(
            (
                torch.cat([keys, layer.keys], dim=2),
                torch.cat([values, layer.values], dim=2),
                torch.cat([positions, one.new_positions[:, None].expand(1, heads, -1)], dim=2),
                None if present is None else torch.cat([present, present.new_ones(1, heads, len(lead))], dim=2),
            )
        )
    return extended, (start + len(lead)).expand(rows)


def decode(
    model: Any,
    prompts: list[list[int]],
    cache: Any,
    stops: set[int],
    max_new_tokens: int | list[int],
    pad_id: int,
) -> list[Decoded]:
    """Greedy tokens for each prompt over `cache` (one shared, or a list with one per prompt), each row stopping at
    its own stop token or after `max_new_tokens` (one for every row, or each row's own)."""
    device, dtype = model.device, model.dtype
    started = clock(device)  # time to first token counts putting the stored cache on the device
    rows = len(prompts)
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * rows
    lead = shared_lead(prompts, cache)
    with torch.inference_mode():
        prefill_started = clock(device)
        if lead:  # the leading tokens every row shares (the instruction, a closed-book chat prefix), once
            docs, starts = _lead_document(model, cache, prompts[0][:lead], rows, device, dtype)
        else:
            docs, starts = _row_documents(model, cache, rows, device, dtype)
        own = [p[lead:] for p in prompts]
        width = max(len(p) for p in own)
        room = width + max(limits)
        batch = _assemble(model, docs, own, starts, room)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in own], device=device)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    stopped = [False] * rows
    finished = [0.0] * rows
    with torch.inference_mode(), batch.active(model):
        batch.prepare(width)
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
        alive = list(range(rows))  # the prompt of each row still in the batch
        while True:
            for row, token in zip(alive, next_ids):
                if stopped[row] or len(tokens[row]) >= limits[row]:
                    continue
                if token in stops:
                    stopped[row], finished[row] = True, time.perf_counter()
                else:
                    tokens[row].append(token)
                    finished[row] = time.perf_counter()
            running = [i for i, row in enumerate(alive) if not stopped[row] and len(tokens[row]) < limits[row]]
            if not running:
                break
            if len(running) < len(alive) and (batch.shares_document or len(running) <= RETIRE_AT * len(alive)):
                # finished rows leave: later steps compute only the rest
                batch.retain(running)
                alive, next_ids = [alive[i] for i in running], [next_ids[i] for i in running]
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
