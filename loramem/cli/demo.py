"""demo: the whole story on the embedded model."""

from __future__ import annotations

from dataclasses import asdict

from loramem.cli.app import app
from loramem.cli.options import JsonOpt, print_json
from loramem.cli.specopts import FROM_SPEC, Use, with_specs
from loramem.memory import load
from loramem.specs import ModelSpec
from loramem.specs.eval import DemoSpec


@app.command()
@with_specs(spec=DemoSpec, model=Use(ModelSpec, exclude=frozenset({("chat_template_kwargs",)})))
def demo(
    spec: DemoSpec = FROM_SPEC,
    model: ModelSpec = FROM_SPEC,
    as_json: bool = JsonOpt,
) -> None:
    """Encode the example document, answer its questions at several compression ratios, then with a document
    adapter and no document token left; the last line states the adapter's margin."""
    from loramem.demo import margin_line, print_table, run_demo, summary, with_endpoints
    from loramem.log import progress_bar

    values = with_endpoints(spec.ratios)
    with progress_bar("loading the model", None):
        lm = load(model)
    rows = run_demo(lm, values, spec.press, adapter=spec.adapter)
    if as_json:
        for row in rows:
            print_json(asdict(row))
        if spec.adapter:
            print_json({"summary": summary(rows), "margin": margin_line(rows)})
    else:
        print_table(rows)
