"""`mome eval`: hallucination removal measured the strict way, through the public API.

Records the base model's outputs, memorizes the facts one after another (lifelong), then
measures with free greedy generation: reliability, generalization, locality, a retention
curve, general ability (perplexity before/after), seconds per fact. Resumable: the state
lives in the report directory and is saved after every fact; the outputs recorded before
memorization (`base_outputs.jsonl`) and after it (`outputs_after.jsonl`) are appended as they
come, so a resumed run generates only what is missing.

With `--sample N`, generalization, locality (near misses and multi-turn included) and the
base model's reliability are measured on a fixed random sample of N facts (reliability itself
always on every fact): at 10,000 facts recording and re-measuring every prompt costs more
generation than memorizing them.

Report keys (report.json), beyond the headline ones:

- `cases.jsonl` beside it holds every prompt asked, its base output, its output after
  memorization, the hit and the `mome_facts` (see client/eval_cases.py); every headline
  figure is recomputed from it by `client.eval_cases.summarize`.
- `subject`: whether facts were posted with their `subject` (`--no-subject`: false).
- `locality_clean`: locality on the locality prompts that name no memorized subject
  (case-insensitive substring); `measured_prompts` counts the prompts of each figure.
- `near_miss_locality`, `near_miss: {other_entity, other_relation: {locality, prompts}}`:
  share of near-miss prompts (client/eval_nearmiss.py) whose first 16 tokens are unchanged.
- `multi_turn: {unrelated_after_fact_unchanged, fact_after_unrelated_exact, prompts}`: chat
  facts asked inside conversations (null for completion facts; client/eval_probes.py).
- `in_context: {reliability, generalization, prompts}` (`--baseline in-context`, else null):
  the plain backbone with the fact stated in the prompt; `baseline` names it.
- `retention_curve` entries: `measured` (every fact memorized so far while at most 1,000 are,
  a fixed-seed sample of 200 above) and `missed` (case indexes that stopped answering).
- `bad_rows: {count, rows: [{line, reason}]}`: data rows skipped (e.g. an empty answer).
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from pathlib import Path

import httpx

from client.eval_cases import case_records, summarize, write_cases
from client.eval_data import (  # noqa: F401  (re-exported: the public names of `mome eval`)
    EvalCase,
    answer_tokens,
    held_out_texts,
    load_cases,
    normalized,
    read_cases,
    starts_with,
    superseded,
    typed_in_lower_case,
)
from client.eval_nearmiss import attach_near_misses
from client.eval_probes import Generation, OutputLog, Plan, Probe
from client.eval_report import write_report
from client.sdk import MomeClient

CONCURRENCY = 64  # requests in flight; the engine batches them (64: +45% over 16 on CPU)
TRANSPORT_RETRIES = 3  # tries per generation request on a dropped connection
CHUNK = 1024  # prompts generated between two appends to an output log
RETENTION_ALL = 1000  # retention measured on every fact memorized so far up to this many
RETENTION_SAMPLE = 200  # and on a fixed-seed sample of this many above


class Evaluator:
    def __init__(self, client: MomeClient, report_dir: Path, log=None, subject: bool = True,
                 in_context: bool = False):
        self.client = client
        self.sample: list[int] | None = None  # cases measured beyond reliability (None: all)
        self.subject = subject  # post facts with their subject
        self.in_context = in_context  # also record the in-context baseline
        self.dir = report_dir
        self.state_file = report_dir / "state.json"
        self.log = log or functools.partial(print, flush=True)  # progress, line by line
        self.state: dict = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        self.base = OutputLog(report_dir / "base_outputs.jsonl")
        self.after = OutputLog(report_dir / "outputs_after.jsonl")

    def save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.state_file)

    # ---- generation --------------------------------------------------------------------

    def generate(self, prompt: str | list[dict], chat: bool, max_tokens: int) -> Generation:
        """Greedy output of a prompt (a chat prompt: a question, or a list of messages)."""
        # Greedy generation is stateless, so a dropped connection is simply asked again: one
        # socket error among 10,000 requests must not end a two-hour run.
        for attempt in range(TRANSPORT_RETRIES):
            try:
                return self._generate_once(prompt, chat, max_tokens)
            except httpx.TransportError:
                if attempt == TRANSPORT_RETRIES - 1:
                    raise
                time.sleep(1.0)

    def _generate_once(self, prompt: str | list[dict], chat: bool, max_tokens: int) -> Generation:
        if chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            out = self.client.chat(messages, temperature=0, max_tokens=max_tokens)
            return Generation(out["choices"][0]["message"]["content"] or "",
                              list(out.get("mome_facts") or []))
        out = self.client.complete(prompt, temperature=0, max_tokens=max_tokens)
        return Generation(out["choices"][0]["text"], list(out.get("mome_facts") or []))

    def generate_many(self, jobs: list[tuple[str | list[dict], bool, int]]) -> list[Generation]:
        """Greedy outputs of (prompt, chat, max_tokens) requests, sent concurrently."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            return list(pool.map(lambda job: self.generate(*job), jobs))

    def generate_into(self, log: OutputLog, probes: list[Probe]) -> None:
        """Generate the probes, appending their outputs to `log` chunk by chunk."""
        for start in range(0, len(probes), CHUNK):
            chunk = probes[start:start + CHUNK]
            log.add(dict(zip([p.key for p in chunk], self.generate_many([p.job() for p in chunk]),
                             strict=True)))

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
        return [starts_with(out.text, c.target) for out, (_, c) in zip(outputs, pairs)]

    # ---- the run -----------------------------------------------------------------------

    def plan(self, cases: list[EvalCase]) -> Plan:
        sampled = self.sample if self.sample is not None else range(len(cases))
        return Plan(frozenset(sampled), frozenset(superseded(cases)), self.in_context)

    def run(self, cases: list[EvalCase], truths: list[str], config: dict,
            window: int = 1, sample: list[int] | None = None) -> dict:
        st = self.state
        if st.get("config", config) != config:
            raise SystemExit(f"{self.state_file} belongs to another run ({st['config']}); "
                             "use another --report dir")
        if "base" not in st:  # a fresh run: outputs left from another one are not its own
            self.base.reset()
            self.after.reset()
        st["config"] = config
        self.sample = sample
        st.setdefault("base", {})
        for key in ("memorized", "seconds", "curve", "failed"):
            st.setdefault(key, [])
        st.setdefault("fact_ids", {})
        self._migrate(cases)
        self.save()  # from here on, the output logs belong to this run
        if not self.started():
            self.record_base(cases, truths)
        self.memorize_all(cases, window)
        return self.measure(cases, truths, self.dir / "cases.jsonl")

    def started(self) -> bool:
        """Whether any fact was posted (the base model can no longer be recorded)."""
        st = self.state
        return bool(st["memorized"] or st["failed"] or st.get("in_flight"))

    def _migrate(self, cases: list[EvalCase]) -> None:
        """A state from before the output logs: its base locality outputs, as a list."""
        old = self.state["base"].get("locality")
        if isinstance(old, list):
            keys = [p.key for p in self.plan(cases).probes(cases, {}) if p.kind == "locality"]
            if len(keys) == len(old) and not self.base.data:
                self.base.add({k: Generation(text, []) for k, text in zip(keys, old)})
            del self.state["base"]["locality"]

    def record_base(self, cases: list[EvalCase], truths: list[str]) -> None:
        """The base model's outputs on every probe, before anything is memorized."""
        plan = self.plan(cases)
        for _ in range(2):  # the second pass: probes built on a base answer of the first
            todo = [p for p in plan.probes(cases, self.base.data)
                    if p.before and p.key not in self.base.data]
            if todo:
                self.log(f"recording base outputs of {len(plan.sampled)} cases ({len(todo)} prompts)")
                self.generate_into(self.base, todo)
        if "ppl_before" not in self.state:
            self.state["ppl_before"] = self.perplexity(truths) if truths else None
        self.save()

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
                self.post(cases, posted)
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
                point = self.retention(cases, done, rng)
                st["curve"].append(point)
                self.log(f"{done}/{len(cases)} facts, {sum(st['seconds']) / done:.2f} s/fact, "
                         f"reliability of those so far {point['reliability']:.3f}"
                         f" ({len(point['missed'])} of {point['measured']} missed)")
                clock = time.perf_counter()  # the measurement is not memorization time
            self.save()

    def post(self, cases: list[EvalCase], i: int) -> None:
        answer = self.client.add_facts([cases[i].fact(self.subject)])
        self.state["in_flight"][str(i)] = answer["job_id"]
        if answer.get("fact_ids"):
            self.state["fact_ids"][str(i)] = answer["fact_ids"][0]

    def retention(self, cases: list[EvalCase], done: int, rng: random.Random) -> dict:
        """Reliability of the facts memorized so far: all of them up to RETENTION_ALL."""
        replaced = superseded(cases[:done])
        current = [i for i in self.state["memorized"] if i not in replaced]
        measured = (current if len(current) <= RETENTION_ALL
                    else sorted(rng.sample(current, RETENTION_SAMPLE)))
        hits = self.hits([cases[j] for j in measured])
        return {"facts": done, "reliability": sum(hits) / len(hits) if hits else 0.0,
                "measured": len(measured), "missed": [j for j, h in zip(measured, hits) if not h]}

    def measure(self, cases: list[EvalCase], truths: list[str],
                cases_file: Path | None = None) -> dict:
        """The figures after memorization; with `cases_file`, the outputs are kept (and reused
        by a resumed run) and the per-prompt outcomes written there."""
        st = self.state
        plan = self.plan(cases)
        probes = plan.probes(cases, self.base.data)
        after = self.after if cases_file is not None else OutputLog(None)
        todo = [p for p in probes if p.after and p.key not in after.data]
        self.log(f"measuring {len(todo)} prompts on {len(cases)} facts "
                 f"({len(plan.sampled)} sampled beyond reliability)")
        self.generate_into(after, todo)
        records = case_records(cases, probes, self.base.data, after.data, {
            "sampled": plan.sampled, "replaced": plan.replaced,
            "memorized": set(st["memorized"]), "fact_ids": st.get("fact_ids", {})})
        if cases_file is not None:
            write_cases(cases_file, records)
        figures = summarize(records)
        if figures["base_reliability"] is None:  # a state from before the output logs
            figures["base_reliability"] = st["base"].get("reliability")
        return {**figures, **self._run_figures(truths), "superseded": len(plan.replaced)}

    def _run_figures(self, truths: list[str]) -> dict:
        st = self.state
        ppl_after = self.perplexity(truths) if truths else None
        info = self.client.request("GET", "/v1/memory")
        return {
            "retention_curve": st["curve"],
            "general_ability": {"perplexity_before": st.get("ppl_before"),
                                "perplexity_after": ppl_after,
                                "ratio": (ppl_after / st["ppl_before"])
                                if ppl_after and st.get("ppl_before") else None,
                                "texts": len(truths)},
            "seconds_per_fact": sum(st["seconds"]) / max(len(st["seconds"]), 1),
            "experts_used": info["experts"],
            "store_bytes": info["store_bytes"],
            "memorized": len(st["memorized"]),
            "failed_to_memorize": len(st["failed"]),
            "method_config": {"memory": info["config"], "train": info["train"],
                              "router": info["router"]},
        }


def run_eval(args) -> dict:
    """Entry point of `mome eval` (arguments from client/cli.py)."""
    from client.launcher import ServerProcess

    if args.window < 1:
        raise SystemExit("--window must be at least 1")
    if args.sample is not None and args.sample < 1:
        raise SystemExit("--sample must be at least 1")
    report_dir = Path(args.report)
    report_dir.mkdir(parents=True, exist_ok=True)
    lower_case = getattr(args, "lower_case", False)
    cases, truths, bad = prepare_cases(args.data, args.format, args.limit, lower_case=lower_case)
    sample = None
    if args.sample is not None and args.sample < len(cases):
        sample = sorted(random.Random(0).sample(range(len(cases)), args.sample))
    with_subject = not getattr(args, "no_subject", False)
    baseline = getattr(args, "baseline", None)
    config = {"data": str(Path(args.data).resolve()), "format": args.format,
              "limit": args.limit, "sample": len(sample) if sample else None}
    config |= ({} if with_subject else {"subject": False}) | ({"baseline": baseline} if baseline else {})
    config |= {"lower_case": True} if lower_case else {}
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
        evaluator = Evaluator(client, report_dir, subject=with_subject,
                              in_context=baseline == "in-context")
        report = evaluator.run(cases, truths, config, window=args.window, sample=sample)
        if args.sweep:
            if server is None:
                raise SystemExit("--sweep restarts the server with other gates: use --embedded")
            report["sweep"] = sweep_gates(server, env, cases, evaluator)
    finally:
        if server is not None:
            server.stop()
    report.update(n_facts=len(cases), format=args.format, model=model,
                  posting_window=args.window, subject=with_subject, baseline=baseline,
                  bad_rows={"count": len(bad), "rows": bad})
    write_report(report_dir, report)
    return report


def prepare_cases(path: str, fmt: str, limit: int | None, log=None, lower_case: bool = False
                  ) -> tuple[list[EvalCase], list[str], list[dict]]:
    """The run's cases (near misses attached), its held-out texts, and the bad rows skipped
    among the rows it covers (reported here, once). `lower_case`: every question, rephrasing
    and subject as a user typing in lower case writes it (answers as they are)."""
    log = log or functools.partial(print, flush=True)
    loaded = read_cases(path, fmt)
    if lower_case:
        loaded.cases = [typed_in_lower_case(c) for c in loaded.cases]
    cases = loaded.cases[:limit] if limit else loaded.cases
    bad = loaded.bad
    if cases and len(cases) < len(loaded.cases):  # the rows after the last case are not read
        bad = [b for b in bad if b["line"] < cases[-1].line]
    if bad:
        shown = ", ".join(f"line {b['line']} ({b['reason']})" for b in bad[:20])
        log(f"skipping {len(bad)} bad row{'s' * (len(bad) > 1)}: {shown}"
            f"{', ...' if len(bad) > 20 else ''}")
    attach_near_misses(cases, loaded.cases)
    return cases, held_out_texts(cases, loaded.truths, len(cases)), bad


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
                                      ("reliability", "generalization", "locality",
                                       "locality_clean", "near_miss_locality")}})
        evaluator.log(f"gate {gate}: {rows[-1]}")
    return rows
