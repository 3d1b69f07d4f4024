"""Command line: ``jaxreg demo``, ``jaxreg serve`` and ``jaxreg build-checkpoint``."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys


def _demo(args: argparse.Namespace) -> int:
    from jaxreg._src.demo.demo import main

    return main(args)


def _serve(args: argparse.Namespace) -> int:
    import logging

    from jaxreg.service import create_server
    from jaxreg.service.limits import Limits

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    try:
        limits = Limits(
            max_tokens=args.max_tokens,
            memory_bytes=args.memory_mb << 20,
            max_models=args.max_models,
            model_ttl_s=args.model_ttl or None,
            seq_wait_s=args.seq_timeout,
            workers=args.workers,
        )
    except ValueError as e:
        print(f"jaxreg serve: {e}", file=sys.stderr)
        return 2
    try:
        server = create_server(
            args.host,
            args.port,
            api_key=api_key,
            state_dir=args.state_dir,
            log_level=args.log_level,
            allow_unauthenticated=args.allow_unauthenticated,
            limits=limits,
        )
    except PermissionError as e:
        print(f"jaxreg serve: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"jaxreg serve: cannot listen on {args.host}:{args.port}: {e.strerror or e}",
            file=sys.stderr,
        )
        return 1
    auth = f"API key required (from ${args.api_key_env})" if api_key else "no API key"
    print(f"jaxreg service on {server.url} ({auth}); Ctrl-C stops it", flush=True)
    if api_key and not api_key.startswith("tml-"):
        print(
            f"jaxreg serve: the official tinker SDK only sends keys that start with 'tml-'; "
            f"${args.api_key_env} does not (jaxreg's own client works with any key)",
            file=sys.stderr,
        )
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the
    # handlers that were there before: make those end the process with status 0.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    print("jaxreg service stopped", flush=True)
    return 0


def _build_checkpoint(args: argparse.Namespace) -> int:
    from jaxreg.service.checkpoint import BASE_PATH, build_base_checkpoint

    path = build_base_checkpoint(
        args.out or BASE_PATH,
        seed=args.seed,
        steps=args.steps,
        progress=lambda i, loss: print(f"step {i}: loss {loss:.4f}", flush=True),
    )
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxreg", description="jaxreg command line")
    sub = parser.add_subparsers(dest="command", required=True)

    from jaxreg._src.demo.demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser("demo", help="fine-tune the reference model with regularizers, end to end")
    p.add_argument(
        "--steps", type=int, default=d.steps, help=f"training steps per KL weight ({d.steps})"
    )
    p.add_argument("--out", help="run directory (default runs/demo-<time>)")
    p.add_argument(
        "--kl-weights",
        type=float,
        nargs="+",
        default=list(d.kl_weights),
        help=f"the KL weights of the sweep ({' '.join(f'{w:g}' for w in d.kl_weights)})",
    )
    p.add_argument(
        "--batch", type=int, default=d.batch_size, help="datums of the new task per step"
    )
    p.add_argument(
        "--replay",
        type=int,
        default=d.replay,
        help="datums of the base skills per step (anchored by the KL term)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=d.learning_rate,
        help=f"peak Adam learning rate ({d.learning_rate:g}), cosine-decayed to 0",
    )
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear learning-rate warmup steps")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evaluations")
    p.add_argument("--eval-size", type=int, default=d.eval_size, help="held-out examples per task")
    p.add_argument(
        "--diagnose-every",
        type=int,
        default=d.diagnose_every,
        help="steps between parameter-space gradient diagnostics (about 3x a step each; 0: off)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--base-url", help="use this service instead of starting one")
    p.add_argument("--api-key", help="API key of --base-url (default $JAXREG_API_KEY)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--tinker",
        action="store_true",
        help="run on Tinker with the official SDK (needs TINKER_API_KEY)",
    )
    p.add_argument("--base-model", help="the Tinker base model, with --tinker")
    p.add_argument(
        "--sdk",
        choices=["jaxreg", "tinker"],
        default="jaxreg",
        help="the client: jaxreg's (default) or the official tinker SDK, same service",
    )
    p.set_defaults(fn=_demo)

    p = sub.add_parser("serve", help="run the reference training service")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--state-dir", default="jaxreg-states", help="where save_state writes")
    p.add_argument(
        "--api-key-env",
        default="JAXREG_API_KEY",
        help="environment variable holding the API key (unset: no key)",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve a non-loopback --host without an API key (refused otherwise)",
    )
    p.add_argument(
        "--memory-mb",
        type=int,
        default=1024,
        help="activation memory the running requests may use together (default 1024)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=1 << 20, help="token-targets per request (2^20)"
    )
    p.add_argument("--max-models", type=int, default=64, help="models held at once (64)")
    p.add_argument(
        "--model-ttl",
        type=float,
        default=6 * 3600.0,
        help="seconds after which an idle model is deleted (0: never; default 6 h)",
    )
    p.add_argument(
        "--seq-timeout",
        type=float,
        default=300.0,
        help="seconds a request may wait for a missing predecessor seq_id (300)",
    )
    p.add_argument("--workers", type=int, default=4, help="threads running requests (4)")
    p.set_defaults(fn=_serve)

    p = sub.add_parser("build-checkpoint", help="rebuild the base checkpoint from its seed")
    p.add_argument("--out", help="where to write (default: the packaged checkpoint)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.set_defaults(fn=_build_checkpoint)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
