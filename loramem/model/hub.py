"""Hugging Face hub failures told apart: gated, unauthorized, not found, offline, each as one line that says what to do.

transformers turns every hub failure into an OSError; the huggingface_hub exception it came from stays in the
exception chain, and its type (not the wording, which changes between versions) decides the message.
"""

from __future__ import annotations

from collections.abc import Iterator

from loramem.errors import LoramemError

_DEFAULT_HINT = "omit --model to use the embedded default model"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def hub_error(name: str, exc: BaseException) -> LoramemError:
    """The one-line error for a model id that could not be loaded from the hub (or its local cache)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    for cause in _chain(exc):
        if isinstance(cause, GatedRepoError):
            return LoramemError(
                f"model {name!r} is gated on the Hugging Face hub: request access at https://huggingface.co/{name}, "
                "then log in (hf auth login) or set HF_TOKEN"
            )
        if isinstance(cause, RepositoryNotFoundError):
            return LoramemError(
                f"model {name!r} was not found on the Hugging Face hub (check the spelling; a private repository "
                "needs a token that may read it: hf auth login or HF_TOKEN)"
            )
        if isinstance(cause, RevisionNotFoundError):
            return LoramemError(f"model {name!r} has no such revision on the Hugging Face hub")
        if isinstance(cause, HfHubHTTPError) and _status(cause) in (401, 403):
            return LoramemError(
                f"the Hugging Face hub refused the token for {name!r} (HTTP {_status(cause)}): log in again "
                "(hf auth login) or fix HF_TOKEN"
            )
        if isinstance(cause, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)):
            return LoramemError(
                f"model {name!r} is not in the local Hugging Face cache and the hub cannot be reached (offline, or "
                f"HF_HUB_OFFLINE=1); download it where there is a network, or {_DEFAULT_HINT}"
            )
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return LoramemError(f"cannot load model {name!r} from the Hugging Face hub: {first}")
