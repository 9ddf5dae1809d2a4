"""Results as a terminal table, a Markdown file, JSON and PNG plots.

Times are medians with the 20 % and 80 % quantiles of the repeats beside them ("1.23 (1.20-1.31)").
The speed plot shows absolute times (ms) with those quantiles as error bars, cases named in plain
words, and a missing measurement (not available, error, failed check) written as "missing" where its
bar would be, never drawn as a zero bar.  memory.png is written only where the allocator reported
peak memory (CUDA), never as empty panels.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable

KIND_TITLES = {"layer": "per layer (forward + backward)",
               "e2e": "end to end (training step: forward + backward + AdamW)",
               "multi": "mixed-adapter inference (LoRA, adapter_names; no grad)"}


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def fmt_spread(r: dict) -> str:
    """"q20-q80" of a record's repeats, "-" where it was not timed."""
    lo, hi = r.get("q20_ms"), r.get("q80_ms")
    if lo is None or hi is None:
        return "-"
    return f"{fmt_ms(lo)}-{fmt_ms(hi)}"


def plain_label(case_id: str) -> str:
    """A case id ("layer/lora/M64 64->176 d0.05") in plain words, two short lines."""
    kind, method, rest = (case_id.split("/", 2) + ["", ""])[:3]
    if kind == "e2e":
        return "training step\n(whole model)"
    if kind == "multi":  # "multi/prefill 8"
        phase, _, n = method.partition(" ")
        return f"{phase}\n{'one adapter' if n == '1' else n + ' adapters mixed'}"
    fields = dict(re.findall(r"([A-Z])(\d+)", rest))
    shape = re.search(r"(\d+)->(\d+)", rest)
    if method == "lora" and shape:
        drop = re.search(r"d([\d.]+)", rest)
        dropout = "no dropout" if drop is None or float(drop.group(1)) == 0 else f"dropout {drop.group(1)}"
        return f"{fields.get('M', '?')} tokens, {shape.group(1)} to {shape.group(2)}\n{dropout}"
    if method == "ia3" and shape:
        where = "feed-forward input" if rest.endswith("ff") else "output"
        return f"{fields.get('M', '?')} tokens, {shape.group(1)} to {shape.group(2)}\n{where} scaling"
    if method == "prefix" and "P" in fields:
        return f"{fields['P']}-token prefix\nbatch {fields.get('B', '?')} x {fields.get('T', '?')} tokens"
    if method == "prompt" and "P" in fields:
        return f"{fields['P']}-token soft prompt\nbatch {fields.get('B', '?')} x {fields.get('T', '?')} tokens"
    return rest or case_id


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
        vs = f" · {r['vs_compile']:.2f}x compile(PEFT)" if r.get("vs_compile") else ""
        return f"pass ({c['max_rel_err']:.1e}){vs}"
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


COLUMNS = ("case", "provider", "ms", "ms 20%-80%", "tokens/s", "peak MiB", "/ frozen", "/ PEFT", "check / note")


def _rows(records: Iterable[dict]) -> list[tuple[str, ...]]:
    rows, last = [], None
    for r in records:
        name = r["case"].split("/", 1)[1] if r["case"] != last else ""
        last = r["case"]
        rows.append((name, r["provider_name"], fmt_ms(r["median_ms"]), fmt_spread(r), fmt_rate(r["tokens_per_s"]),
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
    timers = sorted({r["timer"] for r in doc["cases"] if r.get("timer")})
    out += ["", "`ms` is the median of the timed repeats, `ms 20%-80%` their 20 % and 80 % quantiles"
            + (f" ({', '.join(timers)})" if timers else "") + ". Ratios are times: `/ frozen` against the "
            "frozen floor of the same case, `/ PEFT` against PEFT eager (below 1 is faster).", ""]
    if doc["failures"]:
        out += ["**FAILED**:", ""] + [f"- {f}" for f in doc["failures"]]
    return "\n".join(out) + "\n"


def write_json(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def has_memory_data(doc: dict) -> bool:
    """True when some case carries an allocator peak (CUDA); on a CPU run none does."""
    return any(r.get("peak_mib") is not None for r in doc["cases"])


def write_plots(doc: dict, directory: str) -> list[str]:
    """speed.png (absolute times, 20-80 % error bars) and, where the allocator reported it, memory.png:
    per method, each case's providers side by side.  Returns the paths written; raises ImportError when
    matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in doc["settings"]["methods"] if any(r["method"] == m for r in doc["cases"])]
    providers = [p for p in ("floor", "peft", "compile", "fastpeft", "fastpeft_compile")
                 if any(r["provider"] == p for r in doc["cases"])]
    colors = {"floor": "#9e9e9e", "peft": "#1f77b4", "compile": "#ff7f0e", "fastpeft": "#2ca02c",
              "fastpeft_compile": "#98df8a"}
    names = {r["provider"]: r["provider_name"] for r in doc["cases"]}
    plots = [("speed", "median_ms", "ms per call (median; lines: 20-80 %)")]
    if has_memory_data(doc):
        plots.append(("memory", "peak_mib", "peak memory above the inputs, MiB"))
    written = []
    for what, key, ylabel in plots:
        fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(4.8 * max(1, len(methods)), 4.6), squeeze=False)
        for ax, method in zip(axes[0], methods):
            cases = list(dict.fromkeys(r["case"] for r in doc["cases"] if r["method"] == method))
            width = 0.8 / max(1, len(providers))
            present = [r[key] for r in doc["cases"] if r["method"] == method and r.get(key)]
            top, low = (max(present), min(present)) if present else (1.0, 1.0)
            log = what == "speed" and top > 20 * low  # layer cases (us) beside training steps (ms)
            floor_y = low / 2 if log else 0.0
            for j, p in enumerate(providers):
                xs, values, lows, highs, missing = [], [], [], [], []
                for i, c in enumerate(cases):
                    rec = next((r for r in doc["cases"] if r["case"] == c and r["provider"] == p), None)
                    val = rec.get(key) if rec else None
                    x = i + j * width
                    if val is None:
                        if rec is not None:
                            missing.append(x)
                        continue
                    xs.append(x)
                    values.append(val)
                    if what == "speed" and rec.get("q20_ms") is not None and rec.get("q80_ms") is not None:
                        lows.append(max(0.0, val - rec["q20_ms"]))
                        highs.append(max(0.0, rec["q80_ms"] - val))
                    else:
                        lows.append(0.0)
                        highs.append(0.0)
                ax.bar(xs, values, width, label=names[p], color=colors[p],
                       yerr=[lows, highs] if what == "speed" and xs else None, capsize=2, ecolor="#333333")
                for x in missing:  # no bar: a missing value must not look like the fastest one
                    ax.text(x, low if log else top * 0.02, "missing", rotation=90, ha="center", va="bottom",
                            fontsize=7, color=colors[p])
            ax.set_xlim(-width, len(cases) - 1 + width * len(providers))  # room for every slot, drawn or not
            ax.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(cases))])
            ax.set_xticklabels([plain_label(c) for c in cases], fontsize=7, rotation=15)
            ax.set_title({"lora": "LoRA", "ia3": "IA3", "prefix": "prefix tuning", "prompt": "prompt tuning",
                          "ptuning": "P-tuning", "qlora": "QLoRA (NF4 base)",
                          "multi": "mixed-adapter LoRA inference"}.get(method, method))
            ax.set_ylabel(ylabel + (", log scale" if log else ""), fontsize=8)
            if log:
                ax.set_yscale("log")
            ax.set_ylim(bottom=floor_y)
        axes[0][0].legend(fontsize=7)
        title = f"fastpeft vs PEFT: {'time' if what == 'speed' else 'peak memory'} per call " \
                f"({doc['device']['name']}, {doc['settings']['dtype']})"
        if doc.get("cpu_reference"):
            title += " - CPU reference figures, not kernel performance"
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
    stale = os.path.join(directory, "memory.png")
    if not has_memory_data(doc) and os.path.exists(stale):  # from an earlier GPU run into the same folder
        os.remove(stale)
    try:
        plots = "".join(", " + os.path.basename(p) for p in write_plots(doc, directory))
        if not has_memory_data(doc):
            plots += " (no memory.png: no allocator statistics on this device)"
    except ImportError:
        plots = ""
        log("matplotlib is not installed: plots skipped (`pip install matplotlib` to get them)")
    log(f"wrote {directory}/results.json, results.md{plots}")
