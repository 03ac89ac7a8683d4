"""Write docs/support-matrix.md from a run of the family matrix (tests/test_families.py).

    python tests/support_matrix.py [--out docs/support-matrix.md]

Every cell is a test outcome of this run: nothing is written by hand.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from families import FAMILIES  # noqa: E402

# Test function -> column heading, in table order.
COLUMNS = {
    "test_softcapped_attention_runs_eager": "attention as trained",
    "test_kvpress_agreement": "kvpress agreement (default presses)",
    "test_stored_cache_answers_like_the_document": "stored cache = whole prompt",
    "test_value_group_cache": "value groups",
    "test_int8_cache": "int8 KV",
    "test_train_adapter_targets[attn]": "adapter attn",
    "test_train_adapter_targets[mlp]": "adapter mlp",
    "test_train_adapter_targets[all]": "adapter all",
    "test_adapter_recalls_a_fact_in_the_family_framing": "adapter recall",
    "test_merge": "merge (ties)",
    "test_library": "library",
}
_CASE = re.compile(r"^(?P<test>[^\[]+)\[(?P<family>[^-\]]+)(?:-(?P<param>[^\]]+))?\]$")


def outcomes(xml: Path) -> dict[tuple[str, str], list[str]]:
    """(family, column key) -> outcome of every test case in that cell (passed, failed, skipped)."""
    cells: dict[tuple[str, str], list[str]] = {}
    for case in ET.parse(xml).iter("testcase"):
        match = _CASE.match(case.get("name", ""))
        if not match:
            continue
        test, family, param = match["test"], match["family"], match["param"]
        key = f"{test}[{param}]" if test == "test_train_adapter_targets" else test
        state = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            state = "failed"
        elif case.find("skipped") is not None:
            state = "skipped"
        cells.setdefault((family, key), []).append(state)
    return cells


def cell(states: list[str] | None) -> str:
    if not states:
        return "not run"
    if "failed" in states:
        return f"FAILS ({states.count('failed')}/{len(states)})"
    if all(s == "skipped" for s in states):
        return "skipped"
    return "yes" if len(states) == 1 else f"yes ({states.count('passed')}/{len(states)})"


def render(cells: dict[tuple[str, str], list[str]]) -> str:
    lines = [
        "# Support matrix",
        "",
        f"Generated on {date.today().isoformat()} by `python tests/support_matrix.py` from a run of "
        "`tests/test_families.py`: tiny random models (2 layers, hidden 64) built from each family's config, "
        "with the default tokenizer and a chat template of the family's shape. A cell is the outcome of the "
        "tests in it; what each test checks is in its docstring.",
        "",
        "| family | what it exercises | " + " | ".join(COLUMNS.values()) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for name, family in FAMILIES.items():
        row = [cell(cells.get((name, key))) for key in COLUMNS]
        lines.append(f"| {name} | {family.traits} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Notes:",
        "- Gemma-2 loads with eager attention: SDPA drops its attention-logit softcapping.",
        "- On sliding-window layers a value-group cache keeps the window (tokens further back than the window are "
        "masked); after token eviction the window counts kept tokens, as kvpress does.",
        "- Thinking templates (Qwen3) are framed with thinking off unless `--chat-template-kwargs` says otherwise; "
        "date-stamped templates (Llama-3.2) are rendered on a fixed date recorded in the artifacts.",
        "- Refused with a one-line message: a chat template that raises on a single user turn or rewrites, repeats "
        "or reorders the message text (use `--framing raw`); a `--chat-template-kwargs` key the template does not "
        "use; an artifact framed with other template kwargs or date (exit 3).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "support-matrix.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "families.xml"
        command = [sys.executable, "-m", "pytest", "-q", str(HERE / "test_families.py"), f"--junitxml={xml}"]
        run = subprocess.run(command, cwd=HERE.parent)
        if not xml.exists():
            print("the family matrix did not run", file=sys.stderr)
            return 1
        args.out.write_text(render(outcomes(xml)))
    print(f"wrote {args.out}")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
