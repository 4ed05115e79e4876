"""PromQL helpers for asset tests: metric names in an expression, queries in a Grafana dashboard, vLLM's series by
generation."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

# Words that look like identifiers in PromQL but are not metric names.
PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
        "atan2",
        "start",
        "end",
    }
)

# Series vLLM 0.33 no longer exports: no rule or panel may depend on one.
VLLM_REMOVED_IN_033 = frozenset(
    {
        "vllm:gpu_cache_usage_perc",
        "vllm:gpu_prefix_cache_queries_total",
        "vllm:gpu_prefix_cache_hits_total",
        "vllm:time_per_output_token_seconds_bucket",
        "vllm:time_per_output_token_seconds_sum",
        "vllm:time_per_output_token_seconds_count",
    }
)

# Series a vLLM 0.33 engine exports and a 0.11 one does not, as rules and panels name them (counters with
# _total, histograms by their _bucket/_sum/_count series).
VLLM_ADDED_IN_033 = frozenset(
    {
        "vllm:num_requests_waiting_by_reason",
        "vllm:prompt_tokens_cached_total",
        "vllm:prompt_tokens_by_source_total",
        "vllm:admission_rejections_total",
        "vllm:engine_sleep_state",
        "vllm:iteration_tokens_total",
        *(
            name + suffix
            for name in (
                "vllm:request_prefill_kv_computed_tokens",
                "vllm:request_time_per_output_token_seconds",
                "vllm:request_num_preemptions",
            )
            for suffix in ("_bucket", "_sum", "_count")
        ),
    }
)

DEFAULT_SUBSTITUTIONS: Mapping[str, str] = {
    "model": ".*",
    "upstream": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)")
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\((.*)\)\s*$", re.S)


def metric_names_in_promql(expr: str) -> set[str]:
    """Return the metric names an expression selects (functions, keywords and labels left out)."""
    text = _STRING.sub('""', expr)
    text = _BRACES.sub("{}", text)
    text = _BRACKETS.sub("[]", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name = match.group(1)
        rest = text[match.end() :].lstrip()
        if rest.startswith("("):  # a function or an aggregation
            continue
        if name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def substitute_variables(expr: str, substitutions: Mapping[str, str]) -> str:
    """Replace Grafana variables ($x, ${x}, ${x:fmt}, [[x]]) with values; unknown names raise KeyError."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in substitutions:
            raise KeyError(f"no substitution for Grafana variable ${name} in {expr!r}")
        return substitutions[name]

    return _VARIABLE.sub(repl, expr)


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries(path: str | Path, substitutions: Mapping[str, str] | None = None) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets and query variables, variables substituted."""
    subs = dict(DEFAULT_SUBSTITUTIONS if substitutions is None else substitutions)
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    exprs = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr", "").strip():
                exprs.append(target["expr"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        for pattern in (_LABEL_VALUES, _QUERY_RESULT):
            match = pattern.match(query or "")
            if match:
                exprs.append(match.group(1))
                break
    return [substitute_variables(expr, subs) for expr in exprs]
