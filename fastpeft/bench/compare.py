"""`fastpeft bench --compare A.json B.json`: what changed between two runs, case by case."""

from __future__ import annotations

import json

from .report import fmt_mib, fmt_ms


class CompareError(ValueError):
    """A results file that cannot be compared (missing, not JSON, not a fastpeft bench file)."""


def load(path: str) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise CompareError(f"results file {path} does not exist") from None
    except IsADirectoryError:
        raise CompareError(f"{path} is a folder; pass its results.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompareError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list) or not all(
            isinstance(c, dict) and "id" in c for c in doc["cases"]):
        raise CompareError(f"{path} is not a fastpeft bench results file (expected an object with a 'cases' list "
                           f"of records with an 'id')")
    return doc


def _ratio(old, new) -> str:
    if old is None or new is None or not old:
        return "-"
    return f"{new / old:.2f}x"


def compare(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> str:
    """A table: per case, old and new time and peak memory and the ratios new / old."""
    old = {c["id"]: c for c in a["cases"]}
    new = {c["id"]: c for c in b["cases"]}
    ids = list(dict.fromkeys([*old, *new]))
    rows = []
    for i in ids:
        o, n = old.get(i), new.get(i)
        note = "only in " + (name_a if n is None else name_b) if (o is None or n is None) else ""
        om, nm = (o or {}).get("median_ms"), (n or {}).get("median_ms")
        op, np_ = (o or {}).get("peak_mib"), (n or {}).get("peak_mib")
        if not note:
            so, sn = o.get("status"), n.get("status")
            note = f"status {so} -> {sn}" if so != sn else ""
        rows.append((i, fmt_ms(om), fmt_ms(nm), _ratio(om, nm), fmt_mib(op) if o else "-",
                     fmt_mib(np_) if n else "-", _ratio(op, np_), note))
    cols = ("case", "old ms", "new ms", "new/old", "old MiB", "new MiB", "new/old", "note")
    widths = [max(len(cols[k]), *(len(r[k]) for r in rows)) if rows else len(cols[k]) for k in range(len(cols) - 1)]
    line = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths))) + "  " + cells[-1]
    head = [f"old: {name_a} ({_describe(a)})", f"new: {name_b} ({_describe(b)})", "", line(cols),
            line(tuple("-" * w for w in widths) + ("-" * 4,))]
    return "\n".join(head + [line(r) for r in rows])


def _describe(doc: dict) -> str:
    dev = (doc.get("device") or {}).get("name", "?")
    s = doc.get("settings") or {}
    rev = ((doc.get("git") or {}).get("revision") or "")[:10]
    return ", ".join(x for x in (dev, s.get("preset"), s.get("dtype"), doc.get("created"), rev and f"git {rev}") if x)
