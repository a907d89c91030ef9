"""`ferry serve | web | worker`: argument parsing only; each command lives in its own module."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from shared.settings import Settings


class _Parser(argparse.ArgumentParser):
    def format_help(self) -> str:
        """The help, with the llama.cpp build it would run on. Read only when help is shown:
        loading llama.cpp costs every web process memory, and on a GPU node a CUDA context."""
        from workers.engine import backend

        return f"{super().format_help()}\nllama.cpp build: {backend.describe()}\n"


def _settings_help() -> str:
    lines = ["settings (environment or .env; prefix FERRY_, plus REDIS_URL):"]
    for name, field in Settings.model_fields.items():
        env = "REDIS_URL" if name == "redis_url" else f"FERRY_{name.upper()}"
        default = field.default if field.default is not None else "unset"
        lines.append(f"  {env:<24} {field.description} [default: {default}]")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ferry",
        description="Self-hosted, OpenAI-compatible LLM inference on llama.cpp.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="web + a worker holding the models (+ a private Redis)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model", action="append", metavar="ID_OR_PATH",
                       help="model to load at start (repeatable; default: FERRY_DEFAULT_MODEL)")

    web = sub.add_parser("web", help="the HTTP API (needs REDIS_URL)")
    web.add_argument("--host")
    web.add_argument("--port", type=int)

    worker = sub.add_parser("worker", help="a worker for one device; loads models on command "
                                           "(needs REDIS_URL)")
    worker.add_argument("--model", action="append", metavar="ID_OR_PATH",
                        help="model to load at start (repeatable; default: none)")
    device = worker.add_mutually_exclusive_group()
    device.add_argument("--gpu", type=int, metavar="N", help="pin to GPU N")
    device.add_argument("--cpu", action="store_true", help="run without GPU offload")
    models = sub.add_parser("models", help="the model registry: list, import, pull, start, stop, rm")
    verbs = models.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", help="every registered model and its state")
    imp = verbs.add_parser("import", help="register a local .gguf")
    imp.add_argument("path")
    imp.add_argument("--id")
    pull = verbs.add_parser("pull", help="download a model (https, http, s3, file)")
    pull.add_argument("url")
    pull.add_argument("--id")
    pull.add_argument("--sha256")
    for verb, what in (("start", "load a model on a worker"), ("stop", "unload it everywhere")):
        verbs.add_parser(verb, help=what).add_argument("id")
    rm = verbs.add_parser("rm", help="remove a stopped model and the files Ferry put there")
    rm.add_argument("id")
    accounts = sub.add_parser("users", help="server-mode users: create, token")
    user_verbs = accounts.add_subparsers(dest="verb", required=True)
    create = user_verbs.add_parser("create", help="a new user")
    create.add_argument("name")
    create.add_argument("--email")
    create.add_argument("--admin", action="store_true", help="may download, start, stop models")
    user_verbs.add_parser("token", help="print a JWT and refresh token for a user").add_argument(
        "name")
    batch = sub.add_parser("batch", help="batches over HTTP: submit, list, get, cancel")
    batch_verbs = batch.add_subparsers(dest="verb", required=True)
    where = _Parser(add_help=False)
    where.add_argument("--url", help="Ferry's address (default: http://FERRY_HOST:FERRY_PORT); "
                       "FERRY_API_KEY is sent as the bearer")
    submit = batch_verbs.add_parser("submit", parents=[where],
                                    help="upload a .jsonl of requests and start a batch")
    submit.add_argument("file")
    submit.add_argument("--endpoint", default="/v1/chat/completions",
                        choices=["/v1/chat/completions", "/v1/completions", "/v1/responses",
                                 "/v1/embeddings"])
    submit.add_argument("--wait", action="store_true", help="show progress until it ends")
    batch_verbs.add_parser("list", parents=[where], help="your batches, newest first")
    for verb, what in (("get", "one batch"), ("cancel", "cancel a batch")):
        batch_verbs.add_parser(verb, parents=[where], help=what).add_argument("id")
    api_keys = sub.add_parser("keys", help="server-mode API keys: create")
    key_verbs = api_keys.add_subparsers(dest="verb", required=True)
    new_key = key_verbs.add_parser("create", help="a new API key (printed once)")
    new_key.add_argument("--user", required=True)
    new_key.add_argument("--permissions", default="read,write", help="read, write or read,write")
    new_key.add_argument("--name", dest="key_name", default="cli")
    return p


def check_bind(settings: Settings) -> None:
    """Refuse to expose an unauthenticated API beyond this machine, or auth with no secret."""
    if settings.auth and settings.jwt_secret is None and settings.jwt_private_key_file is None:
        raise SystemExit("FERRY_AUTH=on needs FERRY_JWT_SECRET (a long random string) "
                         "or FERRY_JWT_PRIVATE_KEY_FILE")
    if settings.auth and settings.jwt_private_key_file is not None:
        from shared.credentials.tokens import signing_key

        try:
            signing_key(settings)
        except (OSError, ValueError) as e:
            raise SystemExit(f"FERRY_JWT_PRIVATE_KEY_FILE: {e}") from None
    loopback = settings.host in ("127.0.0.1", "::1", "localhost") or settings.host.startswith("127.")
    if not settings.auth and not loopback and not settings.allow_insecure:
        raise SystemExit(f"Refusing to serve {settings.host} without authentication: set "
                         "FERRY_AUTH=on (and FERRY_JWT_SECRET), or FERRY_ALLOW_INSECURE=1")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {k: v for k in ("host", "port") if (v := getattr(args, k, None)) is not None}
    settings = Settings(**overrides)

    if args.command in ("serve", "web"):
        check_bind(settings)
    if args.command == "serve":
        from ferry.supervise import serve

        return serve(settings, args.model or [settings.default_model])
    if args.command == "web":
        return _web(settings)
    if args.command == "models":
        from ferry.models_cli import main as models_main

        return models_main(settings, args.verb, vars(args))
    if args.command == "batch":
        from ferry.batch_cli import main as batch_main

        return batch_main(settings, args.verb, vars(args))
    if args.command in ("users", "keys"):
        from ferry.users_cli import main as users_main

        return users_main(settings, f"{args.command} {args.verb}", vars(args))
    from workers.main import run

    run(settings, args.model or [], gpu=args.gpu, cpu=args.cpu)
    return 0


def _web(settings: Settings) -> int:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from functions.app import create_app

    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.accesslog = None
    # On SIGTERM hypercorn stops listening, then waits this long for open connections: streams
    # in flight finish. A second signal ends the process at once.
    config.graceful_timeout = settings.drain_s

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def drain() -> None:
            stop.set()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, drain)
        await serve(create_app(settings), config, shutdown_trigger=stop.wait)

    asyncio.run(run())
    return 0
