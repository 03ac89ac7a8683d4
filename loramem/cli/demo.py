"""demo: the whole story on the embedded model."""

from __future__ import annotations

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


@app.command()
def demo(
    ratios: str = typer.Option("0,0.5,0.9,1.0", "--ratios", help="Compression ratios to compare"),
    press: str = typer.Option("snapkv", "--press", help="Press used for every ratio"),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Encode the example document, compress it at several ratios and answer its questions."""
    from loramem.demo import print_table, run_demo

    values = [parse_ratio(r) for r in ratios.split(",") if r.strip()]
    rows = run_demo(load(model, device, dtype), values, press)
    if as_json:
        for row in rows:
            print_json(row)
    else:
        print_table(rows, values)
