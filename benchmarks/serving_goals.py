"""Issue 10's table and goals, from one run of ``benchmarks/serving.py`` (pure: no processes, no I/O).

The run's ``results`` are cells (median over passes) keyed by ``server``, ``rows`` and
``concurrency``; ``servers`` carry ``cold_start_s``, ``create_cli_s`` (ours) and ``memory``. The
server names:

- ``peer``: `mlflow models serve`;
- ``mlserver`` and ``mlserver-batch``: MLServer 1.7.1 plain and with adaptive batching;
- ``ours`` (the default deployment: capture on) and ``ours-nocap`` (capture off).

Each goal is judged only from figures of the same run (ratios; absolute figures only where the
issue gives one: max latency, cold start). "MLServer's p99" is the better (lower) of the two
MLServer servers in the cell, the strictest reading; the throughput goals name adaptive batching
and use ``mlserver-batch``. A goal whose servers or cells were not measured is "not judged".
"""

from __future__ import annotations

import math
from typing import Any

LABELS = {
    "peer": "mlflow models serve",
    "mlserver": "MLServer 1.7.1",
    "mlserver-batch": "MLServer 1.7.1, adaptive batching (32, 2 ms)",
    "ours": "ours (default, capture on)",
    "ours-nocap": "ours, capture off",
}
PEERS = ("peer", "mlserver", "mlserver-batch")
MLSERVERS = ("mlserver", "mlserver-batch")
MEMORY_WHEN = "after load"  # the memory figure the goal is judged on (every process is up by then)


def _cells(results: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, dict[str, Any]]]:
    cells: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for cell in results:
        cells.setdefault((cell["rows"], cell["concurrency"]), {})[cell["server"]] = cell
    return cells


def _order(names: list[str]) -> list[str]:
    known = [name for name in LABELS if name in names]
    return known + sorted(name for name in names if name not in LABELS)


def table(report: dict[str, Any]) -> list[str]:
    """The issue's table (markdown): req/s · p99 ms per server and cell, max latency at c=1, cold
    start to first 200, PSS memory."""
    cells = _cells(report["results"])
    servers = {server["name"]: server for server in report["servers"]}
    names = _order(list(dict.fromkeys([*servers, *(name for group in cells.values() for name in group)])))
    lines = ["| cell | " + " | ".join(LABELS.get(name, name) for name in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for (rows, conc), group in cells.items():
        row = [f"{group[n]['rps']:.0f} · {group[n]['p99_ms']:.1f}" if n in group else "" for n in names]
        lines.append(f"| {rows} row{'s' if rows > 1 else ''}, c={conc} | " + " | ".join(row) + " |")
    for (rows, conc), group in cells.items():
        if conc == 1:
            row = [f"{group[n]['max_ms']:.1f} ms" if n in group else "" for n in names]
            lines.append(f"| max latency, {rows} row{'s' if rows > 1 else ''}, c=1 | " + " | ".join(row) + " |")
    cold = []
    for name in names:
        server = servers.get(name, {})
        text = f"{server['cold_start_s']:.1f} s" if "cold_start_s" in server else ""
        if "create_cli_s" in server:
            text += f" (create returns at {server['create_cli_s']:.1f} s)"
        cold.append(text)
    lines.append("| cold start to first 200 | " + " | ".join(cold) + " |")
    for when in dict.fromkeys(w for s in servers.values() for w in s.get("memory", {})):
        row = [f"{servers[n]['memory'][when]['pss_mb']:.0f} MiB" if when in servers.get(n, {}).get("memory", {})
               else "" for n in names]
        lines.append(f"| memory (PSS, {when}) | " + " | ".join(row) + " |")
    return lines


def peer_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell and peer: throughput ours/theirs and p99 theirs/ours (> 1: ours is better)."""
    out = []
    for (rows, conc), group in _cells(results).items():
        ours = group.get("ours")
        for name in PEERS:
            if ours is None or name not in group:
                continue
            other = group[name]
            out.append({"rows": rows, "concurrency": conc, "peer": name,
                        "throughput": _div(ours["rps"], other["rps"]), "p99": _div(other["p99_ms"], ours["p99_ms"])})
    return out


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def _goal(goal: str, checks: list[tuple[bool, str]], missing: str = "", empty: list[str] | None = None) -> dict[str, Any]:
    """One goal: met when every check holds; not judged (None) when there is nothing to check, or
    when a cell it reads completed no request in its window (``empty``: a failed measurement)."""
    if empty:
        return {"goal": goal, "met": None, "detail": "no request completed in the window of " + ", ".join(empty)}
    if not checks:
        return {"goal": goal, "met": None, "detail": missing or "not measured in this run"}
    return {"goal": goal, "met": all(ok for ok, _ in checks), "detail": "; ".join(text for _, text in checks)}


def empty_cells(results: list[dict[str, Any]]) -> list[str]:
    """Cells in which a server completed no request (a stall longer than the window, or a failure)."""
    return [f"{cell['server']} {cell['rows']}r c={cell['concurrency']}" for cell in results
            if not cell["rps"] or math.isnan(cell["p99_ms"])]


def judge(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 10's goals that this run can judge, each ``{"goal", "met": True/False/None, "detail"}``."""
    cells = _cells(report["results"])
    servers = {server["name"]: server for server in report["servers"]}
    goals = []
    empty = empty_cells(report["results"])

    def judged(goal: str, checks: list[tuple[bool, str]], missing: str, servers_read: tuple[str, ...],
               where: Any = lambda rows, conc: True) -> dict[str, Any]:
        """A goal from the cells ``where`` of ``servers_read``; not judged if one of them is empty."""
        bad = [f"{name} {rows}r c={conc}" for (rows, conc), group in cells.items() if where(rows, conc)
               for name in servers_read if name in group and f"{name} {rows}r c={conc}" in empty]
        return _goal(goal, checks, missing, bad)

    def pairs(name: str, where: Any = lambda rows, conc: True) -> list[tuple[int, int, dict, dict]]:
        return [(rows, conc, g["ours"], g[name]) for (rows, conc), g in cells.items()
                if "ours" in g and name in g and where(rows, conc)]

    checks = [(1 - ours["rps"] / off["rps"] <= 0.05,
               f"{rows}r c={conc}: {100 * (1 - ours['rps'] / off['rps']):.1f}%")
              for rows, conc, ours, off in pairs("ours-nocap") if off["rps"]]
    goals.append(judged("capture costs <= 5% of throughput in every cell", checks, "needs ours-nocap",
                        ("ours", "ours-nocap")))

    at_c1 = pairs("ours-nocap", lambda rows, conc: conc == 1)
    checks = [(ours["p99_ms"] <= 1.5 * off["p99_ms"],
               f"{rows}r: p99 {ours['p99_ms']:.1f} ms = {_div(ours['p99_ms'], off['p99_ms']):.2f}x capture off "
               f"({off['p99_ms']:.1f} ms)") for rows, _c, ours, off in at_c1]
    goals.append(judged("p99 at c=1 with capture <= 1.5x capture off", checks, "needs ours-nocap at c=1",
                        ("ours", "ours-nocap"), lambda rows, conc: conc == 1))

    checks = []
    for (rows, conc), group in cells.items():
        best = _best_mlserver(group, "p99_ms")
        if conc == 1 and "ours" in group and best is not None:
            checks.append((group["ours"]["p99_ms"] <= best["p99_ms"],
                           f"{rows}r: {group['ours']['p99_ms']:.1f} ms vs {best['server']} {best['p99_ms']:.1f} ms"))
    goals.append(judged("p99 at c=1 with capture <= MLServer's", checks, "needs MLServer at c=1",
                        ("ours", *MLSERVERS), lambda rows, conc: conc == 1))

    checks = [(group["ours"]["max_ms"] <= 20.0, f"{rows}r: max {group['ours']['max_ms']:.1f} ms")
              for (rows, conc), group in cells.items() if conc == 1 and "ours" in group]
    goals.append(judged("max latency <= 20 ms at c=1 (capture on)", checks, "needs a c=1 cell", ("ours",),
                        lambda rows, conc: conc == 1))

    for name, factor, rows_wanted in (("peer", 10.0, 1), ("mlserver-batch", 2.5, 1), ("mlserver-batch", 2.0, 100)):
        checks = [(ours["rps"] >= factor * other["rps"],
                   f"{ours['rps']:.0f} vs {other['rps']:.0f} req/s = {_div(ours['rps'], other['rps']):.2f}x")
                  for rows, conc, ours, other in pairs(name, lambda r, c, rw=rows_wanted: r == rw and c == 32)]
        goals.append(judged(f"{rows_wanted}-row c=32 throughput >= {factor:g}x {LABELS[name]}", checks,
                            f"needs {name} at {rows_wanted} row(s), c=32", ("ours", name),
                            lambda r, c, rw=rows_wanted: r == rw and c == 32))

    checks = [(ours["p99_ms"] <= other["p99_ms"] / 5,
               f"{rows}r c={conc}: {ours['p99_ms']:.1f} vs {other['p99_ms']:.1f} ms = 1/"
               f"{_div(other['p99_ms'], ours['p99_ms']):.1f}")
              for rows, conc, ours, other in pairs("peer", lambda r, c: c >= 8)]
    goals.append(judged("p99 at c>=8 <= 1/5 of mlflow models serve's", checks, "needs the peer at c>=8",
                        ("ours", "peer"), lambda rows, conc: conc >= 8))

    checks = []
    for (rows, conc), group in cells.items():
        best = _best_mlserver(group, "p99_ms")
        if conc >= 8 and "ours" in group and best is not None:
            checks.append((group["ours"]["p99_ms"] <= best["p99_ms"] / 2,
                           f"{rows}r c={conc}: {group['ours']['p99_ms']:.1f} vs {best['server']} "
                           f"{best['p99_ms']:.1f} ms = 1/{_div(best['p99_ms'], group['ours']['p99_ms']):.1f}"))
    goals.append(judged("p99 at c>=8 <= 1/2 of MLServer's", checks, "needs MLServer at c>=8",
                        ("ours", *MLSERVERS), lambda rows, conc: conc >= 8))

    ours_memory = servers.get("ours", {}).get("memory", {}).get(MEMORY_WHEN)
    peer_memory = {name: servers[name]["memory"][MEMORY_WHEN]["pss_mb"] for name in PEERS
                   if MEMORY_WHEN in servers.get(name, {}).get("memory", {})}
    checks = []
    if ours_memory and peer_memory:
        lightest = min(peer_memory, key=lambda name: peer_memory[name])
        checks.append((ours_memory["pss_mb"] <= peer_memory[lightest],
                       f"ours {ours_memory['pss_mb']:.0f} MiB vs lightest peer {lightest} "
                       f"{peer_memory[lightest]:.0f} MiB ({MEMORY_WHEN})"))
    goals.append(_goal("memory (PSS, whole deployment) <= the lightest peer", checks, "needs memory of ours and a peer"))

    ours_server = servers.get("ours", {})
    checks = []
    if "cold_start_s" in ours_server:
        checks.append((ours_server["cold_start_s"] <= 3.0, f"first 200 after {ours_server['cold_start_s']:.2f} s"))
    if "cold_start_s" in ours_server and "create_cli_s" in ours_server:
        late = ours_server["create_cli_s"] - ours_server["cold_start_s"]
        checks.append((late <= 0.5, f"create returned {late:.2f} s after it"))
    goals.append(_goal("cold start: first 200 <= 3.0 s, create returns <= 0.5 s after (this run's model)", checks,
                       "needs ours"))
    return goals


def _best_mlserver(group: dict[str, dict[str, Any]], key: str) -> dict[str, Any] | None:
    present = [group[name] for name in MLSERVERS if name in group]
    return min(present, key=lambda cell: cell[key]) if present else None


def goal_lines(goals: list[dict[str, Any]]) -> list[str]:
    words = {True: "met", False: "NOT met", None: "not judged"}
    return [f"  [{words[goal['met']]:>10}] {goal['goal']}: {goal['detail']}" for goal in goals]
