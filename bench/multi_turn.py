"""What a later turn costs to serve, as ratios to the plain server measured beside it.

    python bench/multi_turn.py [--facts 20] [--num-prompts 32] [--output-len 32]
                               [--concurrency 1 8] [--repeats 3]

A store of `--facts` zsRE facts, posted without their subject as users post them, is memorized
through the admin API. A plain server (MOME_MEMORY=false) and a server over that store then
run side by side and are measured pass by pass, the order rotating each round, on two prompt
sets holding the same questions (half the facts' own, half unrelated requests):

- `single`: each question asked alone;
- `later`: each question asked after one earlier, unrelated exchange. The memory server's
  router reads such a turn from a second lower-layer pass over the system turn and that turn
  (the turn asked alone, `ReferenceModel.states_alone`), inside the engine's step.

Per set and concurrency: tokens/s and TTFT p50 as ratios to the plain server in the same
round, each the median over rounds (the upper middle one for an even count);
`later_over_single` divides the later set's ratio by the single set's, which is what the
alone view adds beyond the memory layer itself. Also the facts' answers in both sets (exact
start, greedy), the servers' resident memory (the memory server holds a second copy of the
lower layers for the view), and how the server found each choice's provenance. Prints and
writes JSON (bench/results/multi_turn.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
from pathlib import Path

import psutil
from common import SUBJECTS, TEMPLATES, default_data
from serve import ADMIN_KEY, one_pass, provenance_sources

# An earlier exchange as a chat client sends it back: the user's request and the reply.
EARLIER = ("Tell me three facts about {}.",
           "Sure. Here are three facts about {}: it has a long history, many people "
           "study it, and it still surprises them.")


def load_facts(path: Path, n: int) -> list:
    from client.eval_data import read_cases

    loaded = read_cases(str(path), "zsre")
    for bad in loaded.bad:
        print(f"skipped {path}:{bad['line']}: {bad['reason']}")
    return loaded.cases[:n]


def prompt_sets(cases, n: int, seed: int) -> dict[str, list[list[dict]]]:
    """`n` questions (the facts' own first, then unrelated ones), alone and behind an earlier
    exchange about another subject."""
    rng = random.Random(seed)
    questions = [c.prompt for c in cases][:n // 2]
    questions += [rng.choice(TEMPLATES).format(rng.choice(SUBJECTS))
                  for _ in range(n - len(questions))]
    later = []
    for q in questions:
        subject = rng.choice(SUBJECTS)
        later.append([{"role": "user", "content": EARLIER[0].format(subject)},
                      {"role": "assistant", "content": EARLIER[1].format(subject)},
                      {"role": "user", "content": q}])
    return {"single": [[{"role": "user", "content": q}] for q in questions], "later": later}


def facts_answered(url: str, cases, history: list[dict]) -> list[bool]:
    from client.eval_data import answer_tokens, starts_with
    from client.sdk import MomeClient

    client = MomeClient(url)
    outputs = [client.chat([*history, {"role": "user", "content": c.prompt}], temperature=0,
                           max_tokens=answer_tokens(c.target))["choices"][0]["message"]["content"]
               for c in cases]
    return [starts_with(o, c.target) for o, c in zip(outputs, cases)]


def resident_bytes(pid: int) -> int:
    """The server's resident memory: its process and every child (the engine core)."""
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def measure(servers: dict, sets: dict, output_len: int, levels: list[int],
            repeats: int) -> dict:
    """Per set and level, each server's passes; the order of servers rotates every round."""
    names = list(servers)
    out = {}
    for set_name, prompts in sets.items():
        for c in levels:
            passes = {name: [] for name in names}
            for r in range(repeats):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    passes[name].append(asyncio.run(one_pass(servers[name].url, prompts,
                                                             output_len, c)))
            out[(set_name, c)] = passes
    return out


def ratios(mine: list[dict], base: list[dict]) -> dict:
    rounds = [m["output_tokens_per_s"] / b["output_tokens_per_s"] for m, b in zip(mine, base)]
    ttft = [m["ttft_p50_s"] / b["ttft_p50_s"] for m, b in zip(mine, base)]
    # The median (the upper middle one for an even count), as serve.py takes it.
    return {"ratio": sorted(rounds)[len(rounds) // 2], "ratio_rounds": rounds,
            "ttft_p50_ratio": sorted(ttft)[len(ttft) // 2], "ttft_p50_ratio_rounds": ttft,
            "tokens_per_s": [m["output_tokens_per_s"] for m in mine],
            "ttft_p50_s": [m["ttft_p50_s"] for m in mine],
            "plain_ttft_p50_s": [b["ttft_p50_s"] for b in base],
            "plain_tokens_per_s": [b["output_tokens_per_s"] for b in base]}


def main() -> None:
    from client.launcher import ServerProcess
    from client.sdk import MomeClient

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default=str(default_data("zsre")))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/multi_turn.json")
    args = parser.parse_args()
    if args.repeats < 1 or args.facts < 1 or args.num_prompts < 2:
        parser.error("--repeats and --facts must be at least 1, --num-prompts at least 2")
    cases = load_facts(Path(args.data), args.facts)
    if len(cases) < args.facts:
        parser.error(f"{args.data} holds {len(cases)} usable facts: too few")
    sets = prompt_sets(cases, args.num_prompts, args.seed)
    history = sets["later"][-1][:2]  # an unrelated earlier exchange, for the facts' check

    report = {"benchmark": "multi_turn", "facts": len(cases), "num_prompts": args.num_prompts,
              "output_len": args.output_len, "earlier_exchange": list(EARLIER), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        envs = {"plain": {"MOME_MEMORY": "false"},
                "memory": {"MOME_STORE_DIR": str(tmp / "store"), "MOME_ADMIN_KEY": ADMIN_KEY}}
        servers = {}
        try:
            for name, env in envs.items():  # kept before it starts, so a failed start stops
                servers[name] = ServerProcess(tmp / f"server-{name}.log", env=env)
                servers[name].start()
            admin = MomeClient(servers["memory"].url, api_key=ADMIN_KEY)
            job = admin.wait_for_job(admin.add_facts(
                [c.fact(with_subject=False) for c in cases])["job_id"], poll=1.0)
            print(f"memorized {job['memorized']}/{len(cases)} facts")
            url = servers["memory"].url
            alone, later = facts_answered(url, cases, []), facts_answered(url, cases, history)
            report["facts_memorized"] = job["memorized"]
            report["facts_answered"] = {"single": sum(alone) / len(cases),
                                        "later": sum(later) / len(cases)}
            passes = measure(servers, sets, args.output_len, args.concurrency, args.repeats)
            report["resident_bytes"] = {n: resident_bytes(s.proc.pid) for n, s in servers.items()}
            report["provenance_sources"] = provenance_sources(url)
        finally:
            for server in servers.values():
                server.stop()

    for c in args.concurrency:
        by_set = {s: ratios(passes[(s, c)]["memory"], passes[(s, c)]["plain"]) for s in sets}
        run = {"concurrency": c, **by_set,
               "later_over_single": by_set["later"]["ratio"] / by_set["single"]["ratio"],
               "later_over_single_ttft_p50": (by_set["later"]["ttft_p50_ratio"]
                                              / by_set["single"]["ttft_p50_ratio"])}
        report["runs"].append(run)
        print(f"c={c:>3}  ratio to plain: single {by_set['single']['ratio']:5.3f}  "
              f"later {by_set['later']['ratio']:5.3f}  later/single "
              f"{run['later_over_single']:5.3f}  TTFT p50 later/single "
              f"{run['later_over_single_ttft_p50']:5.3f}")
    answered = report["facts_answered"]
    rss = {n: b / 2**30 for n, b in report["resident_bytes"].items()}
    print(f"facts answered: alone {answered['single']:.3f}, after an exchange "
          f"{answered['later']:.3f}; resident GiB: plain {rss['plain']:.2f}, "
          f"memory {rss['memory']:.2f}; provenance {report['provenance_sources']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
