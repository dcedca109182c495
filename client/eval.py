"""`mome eval`: hallucination removal measured the strict way, through the public API.

Records the base model's outputs, memorizes the facts one after another (lifelong), then
measures with free greedy generation: reliability, generalization, locality, a retention
curve, general ability (perplexity before/after), seconds per fact. Resumable: the state
lives in the report directory and is saved after every fact.

With `--sample N`, generalization, locality and the base model's reliability are measured on
a fixed random sample of N facts (reliability itself always on every fact): at 10,000 facts
recording and re-measuring every prompt costs more generation than memorizing them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from client.sdk import MomeClient

LOCALITY_TOKENS = 16
CONCURRENCY = 64  # requests in flight; the engine batches them (64: +45% over 16 on CPU)
TRANSPORT_RETRIES = 3  # tries per generation request on a dropped connection


def answer_tokens(target: str) -> int:
    """Enough tokens to see whether the output starts with the target."""
    return min(64, 2 * len(target.split()) + 6)


@dataclass
class EvalCase:
    prompt: str
    target: str
    chat: bool
    subject: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    locality: list[str] = field(default_factory=list)
    neighbour_truths: list[str] = field(default_factory=list)  # locality prompt + true answer

    def fact(self) -> dict:
        body = ({"question": self.prompt, "answer": self.target} if self.chat
                else {"prompt": self.prompt, "completion": self.target})
        if self.subject and self.subject in self.prompt:
            body["subject"] = self.subject
        return body


def load_cases(path: str, fmt: str) -> tuple[list[EvalCase], list[str]]:
    """Cases, and true statements usable as a held-out text set for perplexity."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    cases, truths = [], []
    for r in rows:
        if fmt == "counterfact":
            cases.append(EvalCase(r["prompt"], r["target_new"], False, r.get("subject"),
                                  [r["rephrase_prompt"]], [r["locality_prompt"]],
                                  [f"{r['locality_prompt']} {r['locality_ground_truth']}."]))
            truths.append(f"{r['prompt']} {r['ground_truth']}.")
        elif fmt == "zsre":
            cases.append(EvalCase(r["src"], r["alt"], True, r.get("subject"),
                                  [r["rephrase"]] if r.get("rephrase") else [],
                                  [r["loc"]] if r.get("loc") else []))
            if r.get("loc") and r.get("loc_ans"):
                truths.append(f"{r['loc']} {r['loc_ans']}")
        elif fmt == "jsonl":
            cases.append(EvalCase(r["prompt"], r["target"], bool(r.get("chat", False)),
                                  r.get("subject"), list(r.get("paraphrases") or []),
                                  list(r.get("locality_prompts") or [])))
        else:
            raise ValueError(f"unknown format {fmt!r}")
    return cases, truths


def held_out_texts(cases: list[EvalCase], truths: list[str], n_memorized: int,
                   size: int = 200) -> list[str]:
    """A fixed text set no memorized fact rewrites, for perplexity before and after.

    The true statements of the rows after the memorized ones; when the file has too few
    left (a run over all of it), the neighbours' true statements, from the last row back:
    the memorized rows' own true statements are what the counterfactuals contradict.
    """
    rest = truths[n_memorized:n_memorized + size]
    if len(rest) == size or not any(c.neighbour_truths for c in cases):
        return rest or truths[:size]
    rewritten = set(truths[:n_memorized])  # some neighbours are memorized rows themselves
    texts = [t for c in reversed(cases) for t in c.neighbour_truths if t not in rewritten]
    return texts[:size]


def superseded(cases: list[EvalCase]) -> set[int]:
    """Cases asked again later with the same prompt: the server keeps the later answer
    (CounterFact has 56 such prompts, e.g. five twin cities of Tirana)."""
    last = {(c.prompt, c.chat): i for i, c in enumerate(cases)}
    return {i for i, c in enumerate(cases) if last[(c.prompt, c.chat)] != i}


def normalized(text: str) -> str:
    return " ".join(text.split())


def starts_with(generated: str, target: str) -> bool:
    return normalized(generated).startswith(normalized(target))


class Evaluator:
    def __init__(self, client: MomeClient, report_dir: Path, log=None):
        self.client = client
        self.sample: list[int] | None = None  # cases measured beyond reliability (None: all)
        self.dir = report_dir
        self.state_file = report_dir / "state.json"
        self.log = log or functools.partial(print, flush=True)  # progress, line by line
        self.state: dict = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.state_file)

    def generate(self, prompt: str, chat: bool, max_tokens: int) -> str:
        # Greedy generation is stateless, so a dropped connection is simply asked again: one
        # socket error among 10,000 requests must not end a two-hour run.
        for attempt in range(TRANSPORT_RETRIES):
            try:
                return self._generate_once(prompt, chat, max_tokens)
            except httpx.TransportError:
                if attempt == TRANSPORT_RETRIES - 1:
                    raise
                time.sleep(1.0)

    def _generate_once(self, prompt: str, chat: bool, max_tokens: int) -> str:
        if chat:
            out = self.client.chat([{"role": "user", "content": prompt}], temperature=0,
                                   max_tokens=max_tokens)
            return out["choices"][0]["message"]["content"]
        return self.client.complete(prompt, temperature=0, max_tokens=max_tokens)["choices"][0]["text"]

    def generate_many(self, jobs: list[tuple[str, bool, int]]) -> list[str]:
        """Greedy outputs of (prompt, chat, max_tokens) requests, sent concurrently."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            return list(pool.map(lambda job: self.generate(*job), jobs))

    def perplexity(self, texts: list[str]) -> float:
        total, count = 0.0, 0
        for text in texts:
            out = self.client.complete(text, temperature=0, max_tokens=1, echo=True, logprobs=0)
            values = [v for v in out["choices"][0]["logprobs"]["token_logprobs"][:-1] if v is not None]
            total += sum(values)
            count += len(values)
        return math.exp(-total / max(count, 1))

    def hits(self, cases: list[EvalCase], paraphrases: bool = False) -> list[bool]:
        """Whether greedy generation starts with the target, on each prompt (or paraphrase)."""
        pairs = [(p, c) for c in cases for p in (c.paraphrases if paraphrases else [c.prompt])]
        outputs = self.generate_many([(p, c.chat, answer_tokens(c.target)) for p, c in pairs])
        return [starts_with(out, c.target) for out, (_, c) in zip(outputs, pairs)]

    def locality_outputs(self, cases: list[EvalCase]) -> list[str]:
        return self.generate_many([(p, c.chat, LOCALITY_TOKENS)
                                   for c in cases for p in c.locality])

    def reliability(self, cases: list[EvalCase]) -> float:
        return sum(self.hits(cases)) / len(cases) if cases else 0.0

    def run(self, cases: list[EvalCase], truths: list[str], config: dict,
            window: int = 1, sample: list[int] | None = None) -> dict:
        st = self.state
        if st.get("config", config) != config:
            raise SystemExit(f"{self.state_file} belongs to another run ({st['config']}); "
                             "use another --report dir")
        st["config"] = config
        self.sample = sample
        if "base" not in st:
            sampled = [cases[i] for i in sample] if sample is not None else cases
            self.log(f"recording base outputs of {len(sampled)} cases")
            st["base"] = {"locality": self.locality_outputs(sampled),
                          "reliability": self.reliability(sampled)}
            st["ppl_before"] = self.perplexity(truths) if truths else None
            st.update(memorized=[], seconds=[], curve=[], failed=[])
            self.save()
        self.memorize_all(cases, window)
        return self.measure(cases, truths)

    def memorize_all(self, cases: list[EvalCase], window: int) -> None:
        """Post the facts in order, one per request, up to `window` ahead of the one awaited.

        The retention curve is measured every tenth of the run with nothing in flight. A
        fact's seconds are the wall-clock time since the previous one finished (their sum
        is the run's memorization time, whatever the window).
        """
        st = self.state
        in_flight: dict[str, str] = st.setdefault("in_flight", {})  # case index -> job id
        every = max(1, len(cases) // 10)
        rng = random.Random(0)
        done = len(st["memorized"]) + len(st["failed"])
        posted = done + len(in_flight)
        clock = time.perf_counter()
        while done < len(cases):
            checkpoint = min(len(cases), (done // every + 1) * every)
            while posted < checkpoint and posted - done < window:
                in_flight[str(posted)] = self.client.add_facts([cases[posted].fact()])["job_id"]
                posted += 1
                self.save()
            job = self.client.wait_for_job(in_flight[str(done)], poll=0.1)
            del in_flight[str(done)]
            now = time.perf_counter()
            st["seconds"].append(now - clock)
            clock = now
            (st["memorized"] if job["memorized"] else st["failed"]).append(done)
            done += 1
            if done % every == 0 or done == len(cases):
                replaced = superseded(cases[:done])
                current = [i for i in st["memorized"] if i not in replaced]
                sample = current if len(current) <= 200 else rng.sample(current, 200)
                point = {"facts": done, "reliability": self.reliability([cases[j] for j in sample])}
                st["curve"].append(point)
                self.log(f"{done}/{len(cases)} facts, {sum(st['seconds']) / done:.2f} s/fact, "
                         f"reliability of those so far {point['reliability']:.3f}")
                clock = time.perf_counter()  # the measurement is not memorization time
            self.save()

    def measure(self, cases: list[EvalCase], truths: list[str]) -> dict:
        st = self.state
        replaced = superseded(cases)
        current = [c for i, c in enumerate(cases) if i not in replaced]
        sample = self.sample if self.sample is not None else range(len(cases))
        sampled = [cases[i] for i in sample]  # locality: every sampled case
        sampled_current = [cases[i] for i in sample if i not in replaced]
        self.log(f"measuring reliability on {len(current)} facts, generalization on "
                 f"{len(sampled_current)}, locality on {len(sampled)}")
        reliable = self.hits(current)
        para = self.hits(sampled_current, paraphrases=True)
        loc = [a == b for a, b in zip(self.locality_outputs(sampled), st["base"]["locality"],
                                      strict=True)]
        ppl_after = self.perplexity(truths) if truths else None
        info = self.client.request("GET", "/v1/memory")
        return {
            "reliability": sum(reliable) / len(reliable),
            "generalization": sum(para) / len(para) if para else None,
            "locality": sum(loc) / len(loc) if loc else None,
            "retention_curve": st["curve"],
            "general_ability": {"perplexity_before": st["ppl_before"],
                                "perplexity_after": ppl_after,
                                "ratio": (ppl_after / st["ppl_before"])
                                if ppl_after and st["ppl_before"] else None,
                                "texts": len(truths)},
            "seconds_per_fact": sum(st["seconds"]) / max(len(st["seconds"]), 1),
            "experts_used": info["experts"],
            "store_bytes": info["store_bytes"],
            "base_reliability": st["base"]["reliability"],
            "measured_facts": {"reliability": len(current),
                               "generalization": len(sampled_current),
                               "locality": len(sampled), "base_reliability": len(sampled)},
            "superseded": len(replaced),
            "memorized": len(st["memorized"]),
            "failed_to_memorize": len(st["failed"]),
            "method_config": {"memory": info["config"], "train": info["train"],
                              "router": info["router"]},
        }


def write_report(report_dir: Path, report: dict) -> None:
    (report_dir / "report.json").write_text(json.dumps(report, indent=2))
    ga = report["general_ability"]
    lines = [
        f"# mome eval: {report['n_facts']} {report['format']} facts on {report['model']}",
        "",
        "Free greedy generation through the public API; facts memorized one after another.",
        *_sample_note(report),
        "",
        "| metric | value |", "|---|---|",
        f"| reliability | {report['reliability']:.3f} (base model: {report['base_reliability']:.3f}) |",
        f"| generalization | {_fmt(report['generalization'])} |",
        f"| locality | {_fmt(report['locality'])} |",
        f"| general ability (perplexity after / before) | {_fmt(ga['ratio'])} "
        f"({_fmt(ga['perplexity_after'])} / {_fmt(ga['perplexity_before'])}, {ga['texts']} texts) |",
        f"| seconds per fact | {report['seconds_per_fact']:.2f} |",
        f"| experts used | {report['experts_used']} |",
        f"| store size | {report['store_bytes'] / 2**20:.1f} MiB |",
        f"| memorized / failed | {report['memorized']} / {report['failed_to_memorize']} |",
        f"| superseded (same prompt asked again) | {report.get('superseded', 0)} |",
        "", "## Retention curve", "", "| facts memorized | reliability so far |", "|---|---|",
        *[f"| {p['facts']} | {p['reliability']:.3f} |" for p in report["retention_curve"]],
        "", "## Method", "", "```json", json.dumps(report["method_config"], indent=2), "```",
    ]
    if report.get("sweep"):
        lines += ["", "## Gate sweep (served gate; experts as trained)", "",
                  "| gate | reliability | generalization | locality |", "|---|---|---|---|",
                  *[f"| {s['gate']} | {s['reliability']:.3f} | {_fmt(s['generalization'])} | "
                    f"{_fmt(s['locality'])} |" for s in report["sweep"]]]
    (report_dir / "report.md").write_text("\n".join(lines) + "\n")
    _plot(report_dir, report)


def _sample_note(report: dict) -> list[str]:
    counts, n = report.get("measured_facts", {}), report["n_facts"]
    notes = []
    if report.get("superseded"):
        notes.append(f"{report['superseded']} facts were asked again later with another answer "
                     "(same prompt): the server keeps the later one, so reliability and "
                     "generalization count the latest answer per prompt.")
    if counts.get("locality", n) != n:
        notes.append(f"Reliability measured on every fact; generalization, locality and the base "
                     f"model's reliability on a fixed random sample of {counts['locality']} "
                     "(`--sample`).")
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


def run_eval(args) -> dict:
    """Entry point of `mome eval` (arguments from client/cli.py)."""
    from client.launcher import ServerProcess

    if args.window < 1:
        raise SystemExit("--window must be at least 1")
    if args.sample is not None and args.sample < 1:
        raise SystemExit("--sample must be at least 1")
    report_dir = Path(args.report)
    report_dir.mkdir(parents=True, exist_ok=True)
    cases, truths = load_cases(args.data, args.format)
    cases = cases[:args.limit] if args.limit else cases
    truths = held_out_texts(cases, truths, len(cases))
    sample = None
    if args.sample is not None and args.sample < len(cases):
        sample = sorted(random.Random(0).sample(range(len(cases)), args.sample))
    config = {"data": str(Path(args.data).resolve()), "format": args.format,
              "limit": args.limit, "sample": len(sample) if sample else None}
    server = None
    key = args.admin_key or os.environ.get("MOME_ADMIN_KEY") or "mome-eval-admin-key"
    url = args.url
    env = {"MOME_ADMIN_KEY": key, "MOME_STORE_DIR": str(report_dir / "store")}
    if args.embedded:
        server = ServerProcess(report_dir / "server.log", env=env).start()
        url = server.url
    try:
        client = MomeClient(url, api_key=key)
        model = client.model()
        evaluator = Evaluator(client, report_dir)
        report = evaluator.run(cases, truths, config, window=args.window, sample=sample)
        if args.sweep:
            if server is None:
                raise SystemExit("--sweep restarts the server with other gates: use --embedded")
            report["sweep"] = sweep_gates(server, env, cases, evaluator)
    finally:
        if server is not None:
            server.stop()
    report.update(n_facts=len(cases), format=args.format, model=model,
                  posting_window=args.window)
    write_report(report_dir, report)
    return report


def sweep_gates(server, env: dict, cases: list[EvalCase], evaluator: Evaluator) -> list[dict]:
    """Serve the same trained experts under other gates and measure the trade-off."""
    rows = []
    for gate in (0.7, 0.75, 0.8, 0.85, 0.9, 0.95):
        server.stop()
        server.env.update({**env, "MOME_MEMORY_GATE": str(gate)})
        server.start()
        evaluator.client = MomeClient(server.url, api_key=env["MOME_ADMIN_KEY"])
        measured = evaluator.measure(cases, [])
        rows.append({"gate": gate, **{k: measured[k] for k in
                                      ("reliability", "generalization", "locality")}})
        evaluator.log(f"gate {gate}: {rows[-1]}")
    return rows

