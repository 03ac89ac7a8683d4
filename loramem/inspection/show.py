"""inspect's maps and comparisons in the terminal (rich): shaded tokens with a legend, and tables."""

from __future__ import annotations

from typing import Any

from loramem.inspection.kept import Comparison, KeptMap

_LOW, _MID, _HIGH = (120, 25, 25), (125, 100, 15), (25, 120, 45)


def shade(share: float) -> str:
    """A background from red (kept by no slot) through amber to green (kept by every slot)."""
    start, end, t = (_LOW, _MID, share * 2) if share < 0.5 else (_MID, _HIGH, share * 2 - 1)
    r, g, b = (round(x + (y - x) * t) for x, y in zip(start, end))
    return f"white on rgb({r},{g},{b})"


def _visible(text: str) -> str:
    """A token as printed in the map: a line break shown and kept, other control characters escaped."""
    text = text.replace("\n", "↵\n").replace("\t", "⇥")
    return "".join(c if c.isprintable() or c == "\n" else f"\\x{ord(c):02x}" for c in text)


def legend() -> Any:
    from rich.text import Text

    line = Text("kept by: ")
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        line.append(f" {share:.0%} ", style=shade(share))
        line.append(" ")
    return line


def show_kept(console: Any, kept: KeptMap, max_tokens: int) -> None:
    """The document's tokens shaded by their keep share, after a header saying over which slots, and a legend."""
    from rich.text import Text

    start = kept.framing_tokens
    end = min(len(kept.token_ids), start + max_tokens)
    console.print(
        f"[bold]kept tokens[/bold] over {kept.slots()}; mean share {float(kept.share[start:].mean()):.1%}"
        + (f"; stored as {kept.storage} (kept positions exact)" if kept.storage != "native" else "")
    )
    if start:
        framing = float(kept.share[:start].mean())
        console.print(f"[dim]{start} framing tokens (chat template) not shown; mean share {framing:.0%}[/dim]")
    if kept.texts is None:
        console.print("[dim]tokens shown as [ids]: the cache's tokenizer is not on this machine[/dim]")
    body = Text()
    for i in range(start, end):
        body.append(
            _visible(kept.label(i)) + ("" if kept.texts is not None else " "), style=shade(float(kept.share[i]))
        )
    console.print(body)
    if end < len(kept.token_ids):
        console.print(
            f"[dim]... {len(kept.token_ids) - end} more tokens not shown (first {max_tokens} of "
            f"{len(kept.token_ids) - start}; --max-tokens N shows more)[/dim]"
        )
    console.print(legend())


def _tokens(comparison: Comparison, positions: list[int], limit: int = 40) -> str:
    shown = " ".join(repr(comparison.label(p)) for p in positions[:limit])
    return shown + (f" ... (+{len(positions) - limit})" if len(positions) > limit else "") if positions else "-"


def show_comparison(console: Any, comparison: Comparison) -> None:
    """Per-layer Jaccard overlaps and token counts kept by one cache alone, then those tokens."""
    from rich.table import Table

    a, b = comparison.sources
    table = Table(title=f"kept slots: {a} vs {b}", title_justify="left")
    for name in ("layer", "Jaccard (head, position)", "Jaccard (position)", f"only {a}", f"only {b}"):
        table.add_column(name, justify="right")
    for layer, (slots, tokens) in enumerate(zip(comparison.slot_jaccard, comparison.token_jaccard)):
        table.add_row(
            str(layer),
            f"{slots:.3f}",
            f"{tokens:.3f}",
            str(len(comparison.only[0][layer])),
            str(len(comparison.only[1][layer])),
        )
    console.print(table)
    for which, source in enumerate(comparison.sources):
        console.print(f"[bold]tokens only {source} kept[/bold] (by some head of some layer, by no head of the other):")
        console.print(_tokens(comparison, comparison.only_anywhere[which]), markup=False, highlight=False)


def _cell(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def show_norms(console: Any, table: dict[str, Any]) -> None:
    """||dW||_F as a layers x modules table."""
    from rich.table import Table

    short = [m.rsplit(".", 1)[-1] for m in table["modules"]]
    names = short if len(set(short)) == len(short) else table["modules"]
    console.print("[bold]update norms[/bold] ||scale · B A||_F per layer and module:")
    out = Table()
    out.add_column("layer", justify="right")
    for name in names:
        out.add_column(name, justify="right")
    for layer, row in zip(table["layers"], table["frobenius"]):
        out.add_row("-" if layer is None else str(layer), *(_cell(v) for v in row))
    console.print(out)


def show_adapter_comparison(console: Any, result: dict[str, Any]) -> None:
    """The cosine matrix of the adapters' whole updates, then per layer for each pair."""
    from rich.table import Table

    names = [f"#{i}" for i in range(len(result["adapters"]))]
    for name, path in zip(names, result["adapters"]):
        console.print(f"{name} {path}", markup=False, highlight=False)
    matrix = Table(title="cosine of the updates (whole adapter)", title_justify="left")
    matrix.add_column("")
    for name in names:
        matrix.add_column(name, justify="right")
    for name, row in zip(names, result["cosine"]):
        matrix.add_row(name, *(_cell(v, 3) for v in row))
    console.print(matrix)
    per_layer = Table(title="cosine per layer", title_justify="left")
    per_layer.add_column("layer", justify="right")
    for pair in result["per_layer"]:
        per_layer.add_column(" vs ".join(names[i] for i in pair["adapters"]), justify="right")
    for row, layer in enumerate(result["layers"]):
        per_layer.add_row(
            "-" if layer is None else str(layer), *(_cell(p["cosine"][row], 3) for p in result["per_layer"])
        )
    console.print(per_layer)
