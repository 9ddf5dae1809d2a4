"""Results as a terminal table, a Markdown file, JSON and PNG plots."""

from __future__ import annotations

import json
import os
from typing import Iterable

KIND_TITLES = {"layer": "per layer (forward + backward)",
               "e2e": "end to end (training step: forward + backward + AdamW)"}


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def fmt_mib(x: float | None) -> str:
    return "n/a" if x is None else (f"{x:.0f}" if x >= 10 else f"{x:.1f}")


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_check(r: dict) -> str:
    c = r["check"]
    if r["status"] in ("not available", "error"):
        return f"{r['status']}: {r['error']}"
    if c["status"] == "pass":
        return f"pass ({c['max_rel_err']:.1e})"
    if c["status"] == "fail":
        return f"FAIL: {c['detail']}"
    return c["status"]


def header_lines(doc: dict) -> list[str]:
    s, v, d = doc["settings"], doc["versions"], doc["device"]
    lines = []
    if doc.get("cpu_reference"):
        lines.append("NOTE: " + next(n for n in doc["notes"] if n.startswith("no GPU")))
    dev = d["name"] + (f" ({d.get('memory_gib')} GiB)" if d["kind"] == "cuda" else f" ({d.get('threads')} threads)")
    git = doc.get("git") or {}
    rev = (git.get("revision", "")[:10] + ("+dirty" if git.get("dirty") else "")) if git else "unknown"
    lines.append(f"fastpeft bench · preset {s['preset']} · {s['dtype']} · batch {s['batch']} x {s['seq']}"
                 f"{' · quick' if s['quick'] else ''} · {dev}")
    lines.append("versions: " + ", ".join(f"{k} {val or 'missing'}" for k, val in v.items()) + f" · git {rev}"
                 f" · backend {doc['backend']['forced']}")
    lines += [f"note: {n}" for n in doc["notes"] if not n.startswith("no GPU")]
    return lines


COLUMNS = ("case", "provider", "ms", "tokens/s", "peak MiB", "/ frozen", "/ PEFT", "check / note")


def _rows(records: Iterable[dict]) -> list[tuple[str, ...]]:
    rows, last = [], None
    for r in records:
        name = r["case"].split("/", 1)[1] if r["case"] != last else ""
        last = r["case"]
        rows.append((name, r["provider_name"], fmt_ms(r["median_ms"]), fmt_rate(r["tokens_per_s"]),
                     fmt_mib(r["peak_mib"]) if r["median_ms"] is not None else "-", fmt_ratio(r["vs_floor"]),
                     fmt_ratio(r["vs_peft"]), fmt_check(r)))
    return rows


def text_table(doc: dict) -> str:
    out = header_lines(doc)
    for kind, title in KIND_TITLES.items():
        records = [r for r in doc["cases"] if r["kind"] == kind]
        if not records:
            continue
        rows = _rows(records)
        widths = [max(len(COLUMNS[i]), *(len(row[i]) for row in rows)) for i in range(len(COLUMNS) - 1)]
        line = lambda cells: "  ".join(  # noqa: E731
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + "  " + cells[-1]
        out += ["", title, line(COLUMNS), line(tuple("-" * w for w in widths) + ("-" * 12,))]
        for row in rows:
            out.append(line(row))
    if doc.get("overhead"):
        from .overhead import table as overhead_table

        out += ["", "Host overhead per layer call, µs (CPU, one thread; Triton launches stubbed out)",
                overhead_table(doc["overhead"])]
    if doc.get("memory"):
        from .saved_bytes import format_rows

        out += ["", "Memory: " + format_rows(doc["memory"])]
    out.append("")
    if doc["failures"]:
        out.append(f"FAILED: {len(doc['failures'])} fastpeft result(s) wrong or broken:")
        out += [f"  {f}" for f in doc["failures"]]
    else:
        out.append(f"all checks passed ({doc['seconds']} s)")
    return "\n".join(out)


def markdown(doc: dict) -> str:
    out = ["# fastpeft bench", ""] + [f"{line}  " for line in header_lines(doc)]
    for kind, title in KIND_TITLES.items():
        records = [r for r in doc["cases"] if r["kind"] == kind]
        if not records:
            continue
        out += ["", f"## {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for row in _rows(records):
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    if doc.get("overhead"):
        from .overhead import table as overhead_table

        out += ["", "## Host overhead per layer call, µs (CPU, one thread; Triton launches stubbed out)", "", "```",
                overhead_table(doc["overhead"]), "```"]
    if doc.get("memory"):
        from .saved_bytes import format_rows

        out += ["", "## Memory", "", "```", format_rows(doc["memory"]), "```"]
    out += ["", "Ratios are times: `/ frozen` against the frozen floor of the same case, `/ PEFT` against "
            "PEFT eager (below 1 is faster).", ""]
    if doc["failures"]:
        out += ["**FAILED**:", ""] + [f"- {f}" for f in doc["failures"]]
    return "\n".join(out) + "\n"


def write_json(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def write_plots(doc: dict, directory: str) -> list[str]:
    """speed.png and memory.png: per method, each case's providers side by side.  Returns the
    paths written; raises ImportError when matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in doc["settings"]["methods"] if any(r["method"] == m for r in doc["cases"])]
    providers = [p for p in ("floor", "peft", "compile", "fastpeft") if any(r["provider"] == p for r in doc["cases"])]
    colors = {"floor": "#9e9e9e", "peft": "#1f77b4", "compile": "#ff7f0e", "fastpeft": "#2ca02c"}
    names = {r["provider"]: r["provider_name"] for r in doc["cases"]}
    written = []
    for what, key, ylabel in (("speed", "median_ms", "time / PEFT eager (lower is better)"),
                              ("memory", "peak_mib", "peak memory, MiB")):
        fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(4.5 * max(1, len(methods)), 4.2), squeeze=False)
        for ax, method in zip(axes[0], methods):
            cases = list(dict.fromkeys(r["case"] for r in doc["cases"] if r["method"] == method))
            width = 0.8 / max(1, len(providers))
            for j, p in enumerate(providers):
                values = []
                for c in cases:
                    rec = next((r for r in doc["cases"] if r["case"] == c and r["provider"] == p), None)
                    val = rec.get(key) if rec else None
                    if what == "speed" and val is not None:
                        ref = next((r["median_ms"] for r in doc["cases"] if r["case"] == c and r["provider"] == "peft"
                                    and r["median_ms"]), None)
                        val = val / ref if ref else None
                    values.append(val if val is not None else 0.0)
                ax.bar([i + j * width for i in range(len(cases))], values, width, label=names[p], color=colors[p])
            ax.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(cases))])
            ax.set_xticklabels([c.split("/", 1)[0] + "\n" + c.split("/", 2)[-1] for c in cases], fontsize=7,
                               rotation=20)
            if what == "speed":
                ax.axhline(1.0, color="#1f77b4", linewidth=0.8, linestyle="--")
            ax.set_title(method)
            ax.set_ylabel(ylabel, fontsize=8)
            if what == "memory" and doc.get("cpu_reference"):
                ax.text(0.5, 0.5, "no allocator statistics on the CPU", ha="center", transform=ax.transAxes)
        axes[0][0].legend(fontsize=7)
        title = f"fastpeft vs PEFT: {what} ({doc['device']['name']}, {doc['settings']['dtype']})"
        if doc.get("cpu_reference"):
            title += " — CPU reference figures"
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = os.path.join(directory, f"{what}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_all(doc: dict, directory: str, log=print) -> None:
    """results.json, results.md and the plots into `directory` (created if needed)."""
    os.makedirs(directory, exist_ok=True)
    write_json(doc, os.path.join(directory, "results.json"))
    with open(os.path.join(directory, "results.md"), "w") as f:
        f.write(markdown(doc))
    try:
        write_plots(doc, directory)
        plots = ", speed.png, memory.png"
    except ImportError:
        plots = ""
        log("matplotlib is not installed: plots skipped (`pip install matplotlib` to get them)")
    log(f"wrote {directory}/results.json, results.md{plots}")
