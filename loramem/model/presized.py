"""The pre-sized cache of a decoding batch: each layer's document part, then room for every row's own columns.

Each layer holds the documents' kept keys/values (one copy when every row shares the document, so each step reads
it once whatever the batch size; else each row's, zero-padded to the longest row's), then per row room for the
longest question and the answer, so decoding writes each new token in place instead of growing a cache by
concatenation. Questions are left-padded: row b's real question tokens take the last `len_b` columns of the
question block, at positions `n_tokens .. n_tokens + len_b - 1` (its document's original length, whatever was
evicted), and its answer continues from there; every decoding step then writes all rows at one column.

Boolean masks, built once per batch for every column, say what each query may attend to: the document tokens its
row's KV head kept (value-group caches keep different tokens per head; a row whose cache kept fewer tokens than the
longest row's never sees the padding), the row's own non-pad question and answer tokens up to itself (a pad column
attends only to itself so its states stay finite), and, on sliding-window layers, keys whose original position lies
within the window. The cache is a transformers `Cache` to the model and a `loramem.model.attention.BatchedKV` to the
attention that reads it.
"""

from __future__ import annotations

from typing import Any

import torch

# One layer's document part for every row: keys, values [1 or B, H, n, D], kept positions and kept mask [1 or B, H, n]
# (None: every row keeps all n).
Doc = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # keys, values, positions, present


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
        self.pass_blocked: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # the next pass's slices (`prepare`)

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
        self.pass_blocked = [
            (None if doc is None else doc[..., rows, :], new[..., rows, :keys]) for doc, new in self.masks
        ]
        self.offset += q_len

    # --- what the batched attention reads (`loramem.model.attention.BatchedKV`) ---
    def document(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        return layer.doc_keys, layer.doc_values

    def blocked(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        return self.pass_blocked[self.layers[layer_idx].group]

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


def decoder_attentions(model: Any) -> list[Any]:
    """The decoder layers' attention modules, in order (a multimodal model's are under its `language_model`)."""
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


def assemble(model: Any, docs: list[Doc], prompts: list[list[int]], starts: torch.Tensor, room: int) -> PresizedCache:
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
    for attn, (keys, values, positions, present) in zip(decoder_attentions(model), docs):
        window = getattr(attn, "sliding_window", None)
        # layers with equal kept positions share one tensor, so they share one mask per step
        positions = _shared(seen, positions)
        present = None if present is None else _shared(seen, present)
        layers.append(PresizedLayer(keys, values, positions, present, len(prompts), room, window))
    return PresizedCache(layers, new_positions, new_valid)


def aligned(parts: list[PresizedCache], extra: int) -> PresizedCache:
    """The rows of `parts` (batches over one document copy, after a pass each) as one batch, in order: every part's
    written columns moved to end at one column, the leading columns no row uses dropped, and room for `extra` more.

    How rows join a running batch (`loramem.model.running`): a question shorter than the columns so far is padded on
    the left, a longer one pads the running rows; and, since a row that left frees its columns, a batch that never
    empties still spans only its rows' own questions and answers. Each row keeps its original positions (linear in
    its columns), so its masks, rebuilt here, let it see what they did before."""
    first = parts[0]
    for part in parts[1:]:
        if any(a.doc_keys is not b.doc_keys for a, b in zip(first.layers, part.layers)):
            raise ValueError("batches over different document copies cannot be aligned")
    end = max(part.offset for part in parts)
    # each row's unused leading columns once every part ends at `end` (valid columns are a suffix of the written)
    pads = torch.cat([(~part.new_valid[:, : part.offset]).sum(1) + end - part.offset for part in parts])
    drop = int(pads.min())
    width = end - drop
    device = first.new_positions.device
    column = torch.arange(width + extra, device=device)
    shifts = [end - part.offset - drop for part in parts]  # old column + shift = new column
    lines = torch.cat([part.new_positions[:, 0] - shift for part, shift in zip(parts, shifts)])
    new_positions = lines[:, None] + column[None, :]
    new_valid = column[None, :] >= (pads - drop)[:, None]
    rows = len(lines)
    layers = []
    for index, layer in enumerate(first.layers):
        merged = PresizedLayer(
            layer.doc_keys, layer.doc_values, layer.doc_positions, layer.present, rows, width + extra, layer.window
        )
        row = 0
        for part, shift in zip(parts, shifts):
            source = part.layers[index]
            n, begin = source.keys.shape[0], max(0, -shift)
            for new, old in ((merged.keys, source.keys), (merged.values, source.values)):
                new[row : row + n, :, begin + shift : part.offset + shift] = old[:, :, begin : part.offset]
            row += n
        merged.filled = width
        layers.append(merged)
    batch = PresizedCache(layers, new_positions, new_valid)
    batch.offset = width
    return batch
