"""`mome eval`'s report files: report.json, report.md and retention.png."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report_dir: Path, report: dict) -> None:
    (report_dir / "report.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# mome eval: {report['n_facts']} {report['format']} facts on {report['model']}",
        "",
        "Free greedy generation through the public API; facts memorized one after another"
        f"{'' if report.get('subject', True) else ', posted without their subject'}.",
        *_sample_note(report),
        "",
        "| metric | value |", "|---|---|",
        *_metric_rows(report),
        "", "## Retention curve", "",
        "| facts memorized | reliability so far | facts measured | missed |", "|---|---|---|---|",
        *[f"| {p['facts']} | {p['reliability']:.3f} | {p.get('measured', 'n/a')} | "
          f"{_missed(p.get('missed'))} |" for p in report["retention_curve"]],
        "", "## Method", "", "```json", json.dumps(report["method_config"], indent=2), "```",
    ]
    if report.get("sweep"):
        lines += ["", "## Gate sweep (served gate; experts as trained)", "",
                  "| gate | reliability | generalization | locality | locality (clean) | near miss |",
                  "|---|---|---|---|---|---|",
                  *[f"| {s['gate']} | {_fmt(s['reliability'])} | {_fmt(s['generalization'])} | "
                    f"{_fmt(s['locality'])} | {_fmt(s.get('locality_clean'))} | "
                    f"{_fmt(s.get('near_miss_locality'))} |" for s in report["sweep"]]]
    (report_dir / "report.md").write_text("\n".join(lines) + "\n")
    _plot(report_dir, report)


def _metric_rows(report: dict) -> list[str]:
    ga, n = report["general_ability"], report.get("measured_prompts", {})
    ic = report.get("in_context")
    base = f"base model: {_fmt(report['base_reliability'])}"
    general = _fmt(report["generalization"])
    if ic:
        base += f"; fact in the prompt: {_fmt(ic['reliability'])}"
        general += f" (fact in the prompt: {_fmt(ic['generalization'])})"
    rows = [
        f"| reliability | {_fmt(report['reliability'])} ({base}) |",
        f"| generalization | {general} |",
        f"| locality | {_fmt(report['locality'])} |",
    ]
    if "locality_clean" in report:
        rows += [f"| locality, prompts naming no memorized subject | {_fmt(report['locality_clean'])} "
                 f"({n.get('locality_clean', 0)} of {n.get('locality', 0)} prompts) |",
                 f"| near-miss locality | {_fmt(report.get('near_miss_locality'))} "
                 f"({_near_miss(report.get('near_miss') or {})}) |"]
    mt = report.get("multi_turn")
    if mt:
        p = mt["prompts"]
        rows += [f"| multi-turn: unrelated question after the fact, unchanged | "
                 f"{_fmt(mt['unrelated_after_fact_unchanged'])} ({p['unrelated_after_fact']} prompts) |",
                 f"| multi-turn: fact after an unrelated exchange, exact | "
                 f"{_fmt(mt['fact_after_unrelated_exact'])} ({p['fact_after_unrelated']} prompts) |"]
    rows += [
        f"| general ability (perplexity after / before) | {_fmt(ga['ratio'])} "
        f"({_fmt(ga['perplexity_after'])} / {_fmt(ga['perplexity_before'])}, {ga['texts']} texts) |",
        f"| seconds per fact | {report['seconds_per_fact']:.2f} |",
        f"| experts used | {report['experts_used']} |",
        f"| store size | {report['store_bytes'] / 2**20:.1f} MiB |",
        f"| memorized / failed | {report['memorized']} / {report['failed_to_memorize']} |",
        f"| superseded (same prompt asked again) | {report.get('superseded', 0)} |",
    ]
    if (report.get("bad_rows") or {}).get("count"):
        bad = report["bad_rows"]
        rows.append(f"| bad data rows skipped | {bad['count']} (line{'s' * (bad['count'] > 1)} "
                    f"{', '.join(str(b['line']) for b in bad['rows'][:20])}"
                    f"{', ...' if bad['count'] > 20 else ''}) |")
    return rows


def _near_miss(near: dict) -> str:
    return ", ".join(f"{name.replace('_', ' ')}: {_fmt(v['locality'])} on {v['prompts']}"
                     for name, v in near.items()) or "none"


def _missed(missed: list | None) -> str:
    if missed is None:
        return "n/a"
    return ", ".join(map(str, missed[:10])) + (f", ... ({len(missed)})" if len(missed) > 10 else "")


def _sample_note(report: dict) -> list[str]:
    counts, n = report.get("measured_facts", {}), report["n_facts"]
    notes = []
    if report.get("superseded"):
        notes.append(f"{report['superseded']} facts were asked again later with another answer "
                     "(same prompt): the server keeps the later one, so reliability and "
                     "generalization count the latest answer per prompt.")
    if counts.get("locality", n) != n:
        notes.append(f"Reliability measured on every fact; generalization, locality (near misses "
                     "and multi-turn included), the in-context baseline and the base model's "
                     f"reliability on a fixed random sample of {counts['locality']} (`--sample`).")
    return [line for note in notes for line in ("", note)]


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _plot(report_dir: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["retention_curve"]
    panels = 2 if report.get("sweep") else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([p["facts"] for p in curve], [p["reliability"] for p in curve], marker="o")
    ax.set(xlabel="facts memorized", ylabel="reliability of facts so far", ylim=(0, 1.05),
           title="Retention")
    if report.get("sweep"):
        ax = axes[0][1]
        gates = [s["gate"] for s in report["sweep"]]
        for key in ("reliability", "generalization", "locality"):
            ax.plot(gates, [s[key] or 0 for s in report["sweep"]], marker="o", label=key)
        ax.set(xlabel="gate (cosine threshold)", ylim=(0, 1.05), title="Gate trade-off")
        ax.legend()
    fig.tight_layout()
    fig.savefig(report_dir / "retention.png", dpi=100)
    plt.close(fig)
