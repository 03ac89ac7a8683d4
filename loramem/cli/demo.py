"""demo: the whole story on the embedded model."""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import typer

from loramem.cli.app import app
from loramem.cli.options import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    load,
    parse_ratio,
    print_json,
)
from loramem.kv.presses import EVICTION_PRESS


@app.command()
def demo(
    ratios: str = typer.Option(
        "0,0.5,0.9,1.0", "--ratios", help="Compression ratios to compare (0 and 1.0 are always included)"
    ),
    press: str = typer.Option(EVICTION_PRESS, "--press", help="Press used for every ratio"),
    adapter: bool = typer.Option(
        True, "--adapter/--no-adapter", help="Train a QA adapter on the example's pairs and answer at ratio 1.0"
    ),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Encode the example document, answer its questions at several compression ratios, then with a document
    adapter and no document token left; the last line states the adapter's margin."""
    from loramem.demo import margin_line, print_table, run_demo, summary, with_endpoints
    from loramem.log import progress_bar

    values = with_endpoints([parse_ratio(r) for r in ratios.split(",") if r.strip()])
    with progress_bar("loading the model", None):
        lm = load(model, device, dtype)
    rows = run_demo(lm, values, press, adapter=adapter)
    if as_json:
        for row in rows:
            print_json(asdict(row))
        if adapter:
            print_json({"summary": summary(rows), "margin": margin_line(rows)})
    else:
        print_table(rows)
