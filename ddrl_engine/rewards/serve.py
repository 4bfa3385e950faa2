"""Serve a reward model over HTTP for `HttpReward` clients (see ddrl_engine.rewards.http):

    python -m ddrl_engine.rewards.serve --factory my_rewards:make_aesthetic --port 8765
"""
from __future__ import annotations

import argparse
import importlib
import threading

from ddrl_engine.rewards.http import serve_reward


def _load_factory(spec: str):
    """"package.module:function" -> the function (a reward factory, called with no arguments)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--factory must look like 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def main(argv=None) -> None:
    """python -m ddrl_engine.rewards.serve --factory pkg.module:make_reward [--host H] [--port P]:
    builds the reward once (in this process, e.g. on its own GPU) and serves it until interrupted."""

    ap = argparse.ArgumentParser(prog="python -m ddrl_engine.rewards.serve", description=main.__doc__)
    ap.add_argument("--factory", required=True, help="package.module:function returning the reward")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--max-body-mb", type=float, default=1024, help="largest request body accepted (MiB)")
    ap.add_argument("--read-timeout-s", type=float, default=60, help="close connections idle this long")
    ap.add_argument("--max-connections", type=int, default=64, help="requests handled at once; more get 503")
    args = ap.parse_args(argv)
    server = serve_reward(_load_factory(args.factory)(), host=args.host, port=args.port,
                          max_body_bytes=int(args.max_body_mb * (1 << 20)), read_timeout_s=args.read_timeout_s,
                          max_connections=args.max_connections)
    print(f"serving {args.factory} at {server.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
