"""serve: a warm model answering from the caches, adapters and libraries under a folder, over HTTP."""

from __future__ import annotations

from loramem.cli.app import app
from loramem.cli.specopts import FROM_SPEC, with_specs
from loramem.specs import ModelSpec
from loramem.specs.serve import ServeSpec


@app.command()
@with_specs(spec=ServeSpec, model=ModelSpec)
def serve(spec: ServeSpec = FROM_SPEC, model: ModelSpec = FROM_SPEC) -> None:
    """Serve the caches, adapters and libraries under --root over HTTP (native /v1/answers and OpenAI-compatible
    /v1/chat/completions), the model loaded once, requests over one memory decoded in one batch."""
    from loramem.serve.app import run_server

    run_server(spec, model)
