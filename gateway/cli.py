"""The ``glm-gateway`` command: ``serve`` the gateway, ``sim`` the simulated engine, ``demo`` both, or ``keys``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn

import uvloop

from gateway import __version__, logs
from gateway.access import keys
from gateway.app import serve
from gateway.listener import ListenError
from gateway.settings import Settings, SimSettings
from gateway.sim.engine import SimEngine, bound_port
from gateway.sim.engine import serve as serve_sim
from gateway.workers import supervise

log = logging.getLogger("gateway.cli")

DEMO_TEXT = """
glm-gateway demo: the gateway on {gw} in front of a simulated GLM-4-9B-Chat-1M engine on {sim}

  Point an OpenAI client at   {gw}/v1
  Liveness / readiness        {gw}/health/live   {gw}/health/ready
  Health (JSON)               {gw}/health
  Status page                 {gw}/status
  Prometheus metrics          {gw}/metrics

Try it:

  curl -s {gw}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 8}}'

  curl -sN {gw}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], "stream": true}}'

  {python} -m pip install -q openai    # once: the openai client is not one of the gateway's needs
  {python} -c "
from openai import OpenAI
client = OpenAI(base_url='{gw}/v1', api_key='unused')
print(client.chat.completions.create(model='{model}',
      messages=[{{'role': 'user', 'content': 'Hello'}}], max_tokens=8).choices[0].message.content)
for chunk in client.chat.completions.create(model='{model}',
        messages=[{{'role': 'user', 'content': 'Hello'}}], stream=True):
    print(chunk.choices[0].delta.content or '', end='', flush=True)
print()"

Make the engine fail a fifth of its requests with 503 (faults: README, glm-gateway sim), then heal it:

  curl -s {sim}/admin/faults -d '{{"error_rate": 0.2, "error_status": 503}}'
  curl -s -X POST {sim}/admin/reset

One line per request is written below (the access log). Ctrl-C stops both.
"""


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line naming it and the value (argparse's usage block would bury it), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists every option)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="glm-gateway", description="A reverse proxy that guards and observes vLLM engines.")
    parser.add_argument("--version", action="version", version=f"glm-gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_p = commands.add_parser("serve", help="run the gateway in front of vLLM engines")
    Settings.add_arguments(serve_p)
    sim_p = commands.add_parser("sim", help="run the simulated vLLM engine (no GPU needed)")
    SimSettings.add_arguments(sim_p)
    demo_p = commands.add_parser(
        "demo", help="run the simulated engine and the gateway together, and print how to use them"
    )
    demo_p.add_argument("--port", type=int, default=8080, help="gateway port (default: %(default)s)")
    demo_p.add_argument("--sim-port", type=int, default=0, help="engine port; 0 picks a free one (default: 0)")
    demo_p.add_argument("--itl", type=float, default=0.05, help="engine seconds per token (default: %(default)s)")
    keys_p = commands.add_parser("keys", help="manage API keys for --keys-file")
    keys_commands = keys_p.add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")
    new_p = keys_commands.add_parser("new", help="print a fresh random key once, and the entry for the keys file")
    new_p.add_argument("name", help="the key's name in logs and metrics (letters, digits, '-', '_')")
    return parser


def _new_key(name: str) -> int:
    key = keys.new_key()
    entry = keys.file_entry(name, key)
    keys.parse(entry)  # the name is one the keys file accepts
    print(f"API key (shown once, give it to the client):\n\n  {key}\n\nAdd to the keys file:\n\n{entry}")
    return 0


async def _run_sim(settings: SimSettings) -> int:
    engine = SimEngine(settings)
    runner = await serve_sim(engine, settings.host, settings.port)
    print(f"simulated vLLM engine ({settings.model}) on http://{settings.host}:{bound_port(runner)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()
    return 0


async def _run_demo(ns: argparse.Namespace) -> int:
    sim_settings = SimSettings(port=ns.sim_port, itl=ns.itl)
    engine = SimEngine(sim_settings)
    sim_runner = await serve_sim(engine, "127.0.0.1", ns.sim_port)
    sim_url = f"http://127.0.0.1:{bound_port(sim_runner)}"
    settings = dataclasses.replace(
        Settings(),
        host="127.0.0.1",
        port=ns.port,
        upstream=[sim_url],
        drain_timeout=5.0,
        log_level="warning",
        max_connections=1024,  # a demo on a laptop: no open-files warning where the hard limit is low
    )

    def announce(url: str) -> None:
        print(DEMO_TEXT.format(gw=url, sim=sim_url, model=sim_settings.model, python=sys.executable), flush=True)

    try:
        return await serve(settings, announce)
    finally:
        await sim_runner.cleanup()
        print("demo stopped", flush=True)


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        return uvloop.run(coro)
    except ListenError as exc:  # the port is taken: one line, exit 1, no traceback
        print(f"glm-gateway: {exc}", file=sys.stderr)
        return 1


def _refused(command: str, exc: ValueError) -> int:
    """Settings that break a rule: one line naming the flag or the variable and the value, exit 2."""
    print(f"glm-gateway {command}: error: {exc}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    ns = parser.parse_args(argv)
    if ns.command == "serve":
        try:
            settings = Settings.from_namespace(ns)
        except ValueError as exc:
            return _refused("serve", exc)
        logs.configure(settings.log_format, settings.log_level)
        for name in Settings.unknown_env(os.environ, SimSettings.ENV_PREFIX):
            log.warning("%s is set but is no option of glm-gateway serve: ignored (--help lists them)", name)
        return _run(serve(settings) if settings.worker_count == 1 else supervise(settings))
    if ns.command == "keys":
        try:
            return _new_key(ns.name)
        except ValueError as exc:
            parser.error(str(exc))
    if ns.command == "sim":
        try:
            sim_settings = SimSettings.from_namespace(ns)
        except ValueError as exc:
            return _refused("sim", exc)
        logs.configure("text", sim_settings.log_level)
        return _run(_run_sim(sim_settings))
    logs.configure("text", "warning")
    return _run(_run_demo(ns))


if __name__ == "__main__":
    sys.exit(main())
