"""Every closed vocabulary of loramem, defined once as a `Literal` (and its tuple of values, in order).

The specs type their fields with these, so a typo is refused where the setting is read (with the allowed values
named), `--help` lists the choices, and the JSON Schema of a request body enumerates them. Importable without torch.
"""

from __future__ import annotations

from typing import Literal, get_args

Press = Literal["snapkv", "expected_attention", "knorm", "streaming_llm", "tova", "random", "keydiff"]
PRESSES: tuple[Press, ...] = get_args(Press)
# Recorded at encode time unless told otherwise (`all` adds keydiff, which costs a second pass over the keys).
DEFAULT_PRESSES: tuple[Press, ...] = ("snapkv", "expected_attention", "knorm", "streaming_llm", "tova", "random")
EVICTION_PRESS: Press = "snapkv"  # whose recorded scores `compress` and the demo evict by, when none is named

Framing = Literal["chat", "raw"]
FRAMINGS: tuple[Framing, ...] = get_args(Framing)

Granularity = Literal["token", "value-group"]
GRANULARITIES: tuple[Granularity, ...] = get_args(Granularity)
GroupRule = Literal["norm", "uniform", "query"]  # how value groups are scored
GROUP_RULES: tuple[GroupRule, ...] = get_args(GroupRule)

# How kept keys and values are stored: native is as the model computed them.
StoreDtype = Literal["native", "float32", "fp16", "bf16", "int8", "int4"]
STORE_DTYPES: tuple[StoreDtype, ...] = get_args(StoreDtype)
QuantAxis = Literal["token", "channel"]
QUANT_AXES: tuple[QuantAxis, ...] = get_args(QuantAxis)

Format = Literal["qa", "ntp", "mixed"]  # what an adapter is trained on: closed-book QA pairs, raw text, or both
FORMATS: tuple[Format, ...] = get_args(Format)
TargetPreset = Literal["attn", "mlp", "all"]
TARGET_PRESETS: tuple[TargetPreset, ...] = get_args(TargetPreset)
MergeMethod = Literal["ties", "linear", "cat", "dare_ties", "svd"]  # PEFT's add_weighted_adapter combinations
MERGE_METHODS: tuple[MergeMethod, ...] = get_args(MergeMethod)
# These combine A and B entry by entry, so ranks must agree; cat stacks them (rank = sum), svd refactors the sum.
EQUAL_RANK_METHODS: tuple[MergeMethod, ...] = ("ties", "linear", "dare_ties")
DENSITY_METHODS: tuple[MergeMethod, ...] = ("ties", "dare_ties")
# What a routed set's adapters weigh in their merge: each the same, or by their routing scores (eval's library modes).
MergeWeighting = Literal["equal", "routing"]
MERGE_WEIGHTINGS: tuple[MergeWeighting, ...] = get_args(MergeWeighting)

# The adapter at answer time: off; on for question and answer over the base model's cache; on throughout (a cache
# encoded with the adapter). eval adds base_scores: an adapter-encoded cache evicted by the base model's scores.
AdapterMode = Literal["none", "decode", "all"]
ASK_MODES: tuple[AdapterMode, ...] = get_args(AdapterMode)
KVMode = Literal["none", "decode", "all", "base_scores"]
KV_MODES: tuple[KVMode, ...] = get_args(KVMode)
ADAPTER_MODES: tuple[KVMode, ...] = ("decode", "all", "base_scores")  # the KV modes that need a trained adapter
# Over a library of the run's documents, holding no KV of the question's own document.
LibraryMode = Literal["oracle", "routed", "routed-merge", "hybrid", "rag"]
LIBRARY_MODES: tuple[LibraryMode, ...] = get_args(LibraryMode)
MERGE_MODES: tuple[LibraryMode, ...] = ("routed-merge", "hybrid")  # the library modes that answer with a merge
Mode = Literal[KVMode, LibraryMode]
MODES: tuple[Mode, ...] = (*KV_MODES, *LIBRARY_MODES)

DatasetLayout = Literal["narrativeqa", "narrativeqa-json", "longhealth", "squad"]  # what `data convert` reads
DATASET_LAYOUTS: tuple[DatasetLayout, ...] = get_args(DatasetLayout)
NarrativeQASplit = Literal["train", "valid", "test"]
NARRATIVEQA_SPLITS: tuple[NarrativeQASplit, ...] = get_args(NarrativeQASplit)

# rouge_l_matched: ROUGE-L of the answer cut to each reference's length (a long answer gains nothing by its length).
Metric = Literal["rouge_l", "exact_match", "token_f1", "contains", "rouge_l_matched"]
METRICS: tuple[Metric, ...] = get_args(Metric)

Device = str  # auto, cpu, cuda or cuda:N: checked by `model.loading.resolve_device`
Dtype = Literal["auto", "float32", "float16", "bfloat16"]
DTYPES: tuple[Dtype, ...] = get_args(Dtype)

StreamEvents = Literal["ndjson", "sse"]  # how a server streams answers: JSON lines, or server-sent events
STREAM_EVENTS: tuple[StreamEvents, ...] = get_args(StreamEvents)
