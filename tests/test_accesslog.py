"""The access log, as an operator reads it: one line per finished request from ``glm-gateway serve``, field by
field, in text and JSON, after real traffic through the real sim (a good answer, a stream the engine breaks
off, an engine's 503, a malformed body, an unknown path); warnings about a request carry its id and engine."""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from gateway.accesslog import FIELDS, _blocks
from tests.harness import CHAT, HELLO, MODEL, free_port, wait_http

_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


class Served:
    """``glm-gateway sim`` and ``glm-gateway serve`` as processes, stdout and stderr apart."""

    def __init__(self, *gateway_flags: str) -> None:
        sim_port, port = free_port(), free_port()
        self.sim = f"http://127.0.0.1:{sim_port}"
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "gateway"]
        sim_flags = ["--port", str(sim_port), "--ttft", "0.001", "--itl", "0.001"]
        self.sim_proc = subprocess.Popen([*command, "sim", *sim_flags], stdout=subprocess.DEVNULL)
        self.proc = subprocess.Popen(
            [*command, "serve", "--host", "127.0.0.1", "--port", str(port), "--upstream", self.sim,
             "--health-interval", "0.2", *gateway_flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.stdout = self.stderr = ""

    def start(self) -> Served:
        wait_http(self.url + "/health/ready")
        return self

    def stop(self) -> None:
        """SIGTERM (the gateway writes every line before it exits), then the sim."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.stdout, self.stderr = self.proc.communicate(timeout=60)
        self.sim_proc.terminate()
        self.sim_proc.wait(30)

    def faults(self, **values: Any) -> None:
        request = urllib.request.Request(self.sim + "/admin/faults", data=json.dumps(values).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    s = Served(*request.param)
    try:
        yield s.start()
    finally:
        s.stop()


def post(url: str, body: bytes, rid: str) -> int:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json", "X-Request-Id": rid}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def traffic(s: Served) -> dict[str, bytes]:
    """A good answer, a stream broken off after its first token, an engine's 503, a malformed body, a 404."""
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    good = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=3, extra_headers={"X-Request-Id": "good-1"}
    )
    assert good.usage is not None and good.usage.completion_tokens == 3
    s.faults(drop_after_tokens=1)
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, stream=True, extra_headers={"X-Request-Id": "drop-1"}
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    s.faults(drop_after_tokens=-1, error_rate=1.0, error_status=503)
    busy = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 2}).encode()
    assert post(s.url + CHAT, busy, "busy-1") == 503
    s.faults(error_rate=0.0)
    assert post(s.url + CHAT, b'{"model": ', "bad-1") == 400
    assert post(s.url + "/nowhere", b"", "lost-1") == 404
    client.close()
    return {"busy-1": busy, "bad-1": b'{"model": '}


def text_fields(line: str) -> dict[str, Any]:
    """A logfmt line back as values: ``-`` is None, quoted strings unquoted, numbers as numbers."""
    out: dict[str, Any] = {}
    for key, raw in _PAIR.findall(line):
        if raw == "-":
            out[key] = None
        elif raw.startswith('"'):
            out[key] = json.loads(raw)
        elif re.fullmatch(r"\d+", raw):
            out[key] = int(raw)
        elif re.fullmatch(r"\d+\.\d+", raw):
            out[key] = float(raw)
        else:
            out[key] = raw
    return out


def lines(s: Served, fmt: str) -> dict[str, dict[str, Any]]:
    """Every access-log line on stdout, by request id; each request exactly once, every field present."""
    entries = [json.loads(line) if fmt == "json" else text_fields(line) for line in s.stdout.splitlines() if line]
    for entry in entries:
        assert tuple(entry) == FIELDS, entry
    ids = [e["request_id"] for e in entries]
    assert len(ids) == len(set(ids)), ids
    return {e["request_id"]: e for e in entries}


def timings(entry: dict[str, Any], *present: str) -> None:
    for name in ("queue_wait", "first_byte", "ttft"):
        if name in present:
            assert isinstance(entry[name], float) and 0 <= entry[name] <= entry["duration"], (name, entry)
        else:
            assert entry[name] is None, (name, entry)
    assert isinstance(entry["duration"], float) and entry["duration"] > 0


@pytest.mark.parametrize(
    ("served", "fmt"), [(("--access-log", "text"), "text"), (("--access-log", "json", "--log-format", "json"), "json")],
    indirect=["served"],
)  # fmt: skip
def test_one_line_per_request_field_by_field(served: Served, fmt: str) -> None:
    bodies = traffic(served)
    served.stop()
    log = lines(served, fmt)
    assert set(log) >= {"good-1", "drop-1", "busy-1", "bad-1", "lost-1"}
    common = {"client": "127.0.0.1", "key": "anonymous"}

    good = log["good-1"]
    assert good["time"].endswith("Z") and good["time"][:2] == "20"
    assert {k: good[k] for k in ("method", "path", "model", "status", "error_type", "upstream", *common)} == {
        "method": "POST", "path": CHAT, "model": MODEL, "status": 200, "error_type": None, "upstream": served.sim,
        **common,
    }  # fmt: skip
    assert good["completion_tokens"] == 3 and good["prompt_tokens"] > 0
    assert good["bytes_in"] > 0 and good["bytes_out"] > 0
    timings(good, "queue_wait", "first_byte", "ttft")

    drop = log["drop-1"]  # the 200 went out, then the engine reset the connection: an error event, counted so
    assert (drop["status"], drop["error_type"], drop["upstream"], drop["model"]) == (
        200, "upstream_error", served.sim, MODEL,
    )  # fmt: skip
    timings(drop, "queue_wait", "first_byte", "ttft")

    busy = log["busy-1"]  # the engine's own 503 (not its "busy" refusal), passed through
    assert (busy["status"], busy["error_type"], busy["upstream"]) == (503, "upstream_error", served.sim)
    assert busy["bytes_in"] == len(bodies["busy-1"]) and busy["completion_tokens"] is None
    timings(busy, "queue_wait", "first_byte", "ttft")  # a whole answer: its first byte

    bad = log["bad-1"]  # refused by the gateway before any engine: no model, no engine, no timing
    assert (bad["status"], bad["error_type"], bad["upstream"], bad["model"]) == (400, "invalid_request", None, None)
    assert bad["bytes_in"] == len(bodies["bad-1"]) and bad["bytes_out"] > 0
    assert bad["prompt_tokens"] is None and bad["completion_tokens"] is None
    timings(bad)

    lost = log["lost-1"]
    assert (lost["method"], lost["path"], lost["status"], lost["error_type"]) == ("POST", "/nowhere", 404, "not_found")

    warnings = [w for w in map(_json_or_none, served.stderr.splitlines()) if w and w.get("request_id") == "drop-1"]
    if fmt == "json":  # the warning about the broken stream names the request and the engine as fields
        assert warnings and all(w["upstream"] == served.sim and w["level"] == "warning" for w in warnings), warnings
    else:
        assert any(
            "request_id=drop-1" in line and f"upstream={served.sim}" in line for line in served.stderr.splitlines()
        )


def _json_or_none(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@pytest.mark.parametrize("served", [("--access-log", "text")], indirect=True)
def test_a_path_with_spaces_and_quotes_stays_one_field(served: Served) -> None:
    assert post(served.url + '/v1/a%20"b', b"", "odd-1") in (404, 502)
    served.stop()
    (line,) = [line for line in served.stdout.splitlines() if "request_id=odd-1" in line]
    assert text_fields(line)["path"] == '/v1/a "b'


@pytest.mark.parametrize("served", [("--access-log", "off")], indirect=True)
def test_access_log_off_writes_nothing(served: Served) -> None:
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    client.close()
    served.stop()
    assert served.stdout == ""


@pytest.mark.parametrize("served", [("--access-log", "json", "--workers", "2")], indirect=True)
def test_two_workers_lines_never_mix_on_one_pipe(served: Served) -> None:
    """Both workers write to the one stdout pipe, which nobody reads until the end (their writes block and
    resume together): every line arrives whole, each request exactly once."""
    ids = [f"mix-{i}" for i in range(300)]
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 2}).encode()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # a connection per request: both workers serve
        statuses = list(pool.map(lambda rid: post(served.url + CHAT, body, rid), ids))
    assert statuses == [200] * len(ids)
    with urllib.request.urlopen(served.url + "/status", timeout=10) as r:
        workers = json.loads(r.read())["workers"]
    assert all(w["admitted"] > 0 for w in workers), workers
    served.stop()
    logged = lines(served, "json")  # every line parses, with every field in order: none mixed with another
    assert set(logged) == set(ids)


def test_lines_are_written_in_whole_blocks_a_pipe_delivers_at_once() -> None:
    """What each write(2) carries: whole lines, at most PIPE_BUF bytes unless one line alone is longer."""
    lines = [f"request_id=r{i} path=/v1/{'é' * (i % 50)}\n" for i in range(500)] + ["x" * 5000 + "\n", "tail\n"]
    blocks = _blocks(lines)
    assert "".join(blocks) == "".join(lines)
    for block in blocks:
        assert block.endswith("\n")
        assert len(block.encode()) <= 4096 or block.count("\n") == 1, len(block.encode())
    assert len(blocks) > 1
