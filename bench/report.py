"""Machine description, per-scenario summaries, the printed table and the JSON file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys


def machine_info(pg_version: str, pgbouncer_version: str | None, pgbench_path: str) -> dict:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                    break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    try:
        pgbench_v = subprocess.run([pgbench_path, "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pgbench_v = "?"
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {
        "nproc": nproc,
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": sys.version.split()[0] + f" ({sys.executable})",
        "postgres": pg_version,
        "pgbench": pgbench_v,
        "pgbouncer": pgbouncer_version or "not used",
        "loadavg_at_start": load,
    }


def print_machine(info: dict, settings: dict, out=sys.stdout) -> None:
    print("=== machine", file=out)
    for k in ("nproc", "cpu_model", "memory", "kernel", "python", "postgres", "pgbench", "pgbouncer",
              "proxy", "proxy-base", "loadavg_at_start"):
        if k in info:
            print(f"  {k:17} {info[k]}", file=out)
    print("=== settings", file=out)
    for k, v in settings.items():
        print(f"  {k:17} {v}", file=out)
    print(file=out, flush=True)


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ratio references: (target, key suffix, column label); "vs_<suffix>" = tps / the reference's tps,
# "cpu_vs_<suffix>" = pooler core-us/tx / the reference's (poolers only)
TPS_REFS = (("pgbouncer", "pgbouncer", "vs PgB"), ("pgbouncer-reset", "pgbouncer_reset", "vs PgB+reset"),
            ("direct", "direct", "vs direct"), ("proxy-base", "proxy_base", "vs base"))
CPU_REFS = (("pgbouncer", "pgbouncer", "PgB"), ("pgbouncer-reset", "pgbouncer_reset", "PgB+reset"),
            ("proxy-base", "proxy_base", "base"))
CORE_US_NOTE = ("pooler core-us/tx: CPU time (user+system, all threads) of the pooler process per transaction,\n"
                "  in microseconds of one core (clock-tick resolution: 10 ms per run)")


def _ratio(a, b):
    return (a / b) if (a is not None and b) else None


def summarize(runs: list[dict], scenarios: list[str], targets: list[str], bigresult: dict | None) -> list[dict]:
    rows = []
    for sc in scenarios:
        sc_runs = [r for r in runs if r["scenario"] == sc]
        if not sc_runs:
            continue
        by_target = {}
        for t in targets:
            tr = [r for r in sc_runs if r["target"] == t]
            if not tr:
                continue
            ok = [r for r in tr if r.get("status") == "ok"]
            row = {
                "scenario": sc, "target": t, "runs": len(tr), "runs_ok": len(ok),
                "tps": _median([r.get("tps") for r in ok]),
                "latency_ms": _median([r.get("latency_ms") for r in ok]),
                "tps_min": min((r["tps"] for r in ok if "tps" in r), default=None),
                "tps_max": max((r["tps"] for r in ok if "tps" in r), default=None),
                "pooler_us_per_txn": _median([r.get("pooler_us_per_txn") for r in ok]),
                "server_us_per_txn": _median([r.get("server_us_per_txn") for r in ok]),
                "client_us_per_txn": _median([r.get("client_us_per_txn") for r in ok]),
                "pooler_rss_kb": _median([r.get("pooler_rss_kb") for r in tr]),
                "pooler_threads": _median([r.get("pooler_threads") for r in tr]),
                "failed_txns": sum(int(r.get("failed") or 0) for r in tr),
                "expected_to_fail": any(r.get("expected_to_fail") for r in tr),
            }
            errs = [r for r in tr if r.get("status") != "ok"]
            if errs:
                row["error"] = errs[0].get("error")
                # what the failing runs still managed (aborted clients make this a partial number)
                row["tps_failed_runs"] = _median([r.get("tps") for r in errs])
            if bigresult and sc.startswith("bigresult") and row["tps"]:
                row["mb_per_s"] = row["tps"] * bigresult["wire_bytes"] / 1e6
            by_target[t] = row
            rows.append(row)
        for row in by_target.values():
            for ref, key, _label in TPS_REFS:
                r = by_target.get(ref)
                row[f"vs_{key}"] = _ratio(row.get("tps"), r.get("tps")) if r else None
            for ref, key, _label in CPU_REFS:
                r = by_target.get(ref)
                row[f"cpu_vs_{key}"] = _ratio(row.get("pooler_us_per_txn"), r.get("pooler_us_per_txn")) if r else None
    return rows


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def print_table(rows: list[dict], out=sys.stdout) -> None:
    if not rows:
        return
    present = {r["target"] for r in rows}
    refs = [(key, label) for ref, key, label in TPS_REFS if ref in present]
    headers = (["scenario", "target", "ok/runs", "TPS(med)", "min..max", "lat ms"] + [label for _k, label in refs]
               + ["pooler core-us/tx", "server us/tx", "client us/tx"])
    big = any(r.get("mb_per_s") is not None for r in rows)
    if big:
        headers.append("MB/s")
    table = []
    for r in rows:
        line = [
            r["scenario"], r["target"], f"{r['runs_ok']}/{r['runs']}",
            _f(r["tps"], ".0f"),
            "-" if r["tps_min"] is None else f"{r['tps_min']:.0f}..{r['tps_max']:.0f}",
            _f(r["latency_ms"], ".3f"),
        ] + [_f(r.get(f"vs_{key}"), ".2f") for key, _label in refs] + [
            _f(r["pooler_us_per_txn"], ".1f"), _f(r["server_us_per_txn"], ".1f"),
            _f(r["client_us_per_txn"], ".1f"),
        ]
        if big:
            line.append(_f(r.get("mb_per_s"), ".1f"))
        table.append(line)
    _print_grid(headers, table, out)
    print(f"vs X: TPS / X's TPS.\n{CORE_US_NOTE}.", file=out)
    failures = [r for r in rows if r.get("error")]
    passed = [r for r in rows if r.get("expected_to_fail") and r["runs_ok"] == r["runs"]]
    if failures or passed:
        print("\nfailures (first error line of the first failing run):", file=out)
        for r in failures:
            partial = r.get("tps_failed_runs")
            extra = f" [failing runs still reported tps {partial:.0f}]" if partial else ""
            verdict = "FAILED (expected)" if r.get("expected_to_fail") else "FAILED (UNEXPECTED)"
            print(f"  {r['scenario']} / {r['target']}: {verdict} {r['runs'] - r['runs_ok']}/{r['runs']} runs: "
                  f"{r['error']}{extra}", file=out)
    for r in passed:
        print(f"  {r['scenario']} / {r['target']}: passed although expected to fail", file=out)
    out.flush()


def print_comparison(rows: list[dict], subject: str = "proxy", out=sys.stdout) -> None:
    """Per scenario: the subject's TPS and pooler core-us/tx, then each reference that ran
    (proxy-base, pgbouncer-reset, pgbouncer) with the subject's ratios against it."""
    present = {r["target"] for r in rows}
    refs = [(ref, key) for ref, key, _label in reversed(CPU_REFS) if ref in present]
    if subject not in present or not refs:
        return
    by = {(r["scenario"], r["target"]): r for r in rows}
    headers = ["scenario", "target", "TPS(med)", "pooler core-us/tx",
               f"{subject} TPS/X", f"{subject} CPU/X", f"{subject} core-us/tx - X"]
    table = []
    for sc in dict.fromkeys(r["scenario"] for r in rows):
        me = by.get((sc, subject))
        if me is None:
            continue
        table.append([sc, subject, _f(me["tps"], ".0f"), _f(me["pooler_us_per_txn"], ".1f"), "", "", ""])
        for ref, key in refs:
            r = by.get((sc, ref))
            if r is None:
                continue
            a, b = me.get("pooler_us_per_txn"), r.get("pooler_us_per_txn")
            table.append([sc, ref, _f(r.get("tps"), ".0f"), _f(b, ".1f"),
                          _f(me.get(f"vs_{key}"), ".2f"), _f(me.get(f"cpu_vs_{key}"), ".2f"),
                          _f(a - b if a is not None and b is not None else None, "+.1f")])
    if not table:
        return
    print(f"\n=== {subject} against X = {', '.join(ref for ref, _k in refs)} "
          f"(TPS/X > 1: {subject} faster; CPU/X < 1: {subject}'s pooler spends less CPU per transaction)",
          file=out)
    _print_grid(headers, table, out)


def print_idle_table(recs: list[dict], out=sys.stdout) -> None:
    if not recs:
        return
    headers = ["scenario", "target", "status", "connected", "connect s", "RSS before MB", "RSS idle MB",
               "kB/client", "threads", "idle CPU ms", "login us/client"]
    table = []
    for r in recs:
        table.append([
            r["scenario"], r["target"], r.get("status", "?"), f"{r.get('connected', 0)}/{r['clients']}",
            _f(r.get("connect_s"), ".1f"),
            _f(r["rss_before_kb"] / 1024 if r.get("rss_before_kb") else None, ".1f"),
            _f(r["rss_idle_kb"] / 1024 if r.get("rss_idle_kb") else None, ".1f"),
            _f(r.get("rss_per_client_kb"), ".1f"),
            "-" if r.get("threads_idle") is None else f"{r.get('threads_before')}->{r['threads_idle']}",
            _f(r.get("idle_cpu_ms"), ".1f") + f" / {r['idle_seconds']:.0f}s",
            _f(r.get("login_cpu_us_per_client"), ".0f"),
        ])
    print(file=out)
    _print_grid(headers, table, out, left=1)
    for r in recs:
        if r.get("error"):
            print(f"  {r['scenario']} / {r['target']}: {r['status']}: {r['error']}", file=out)


def _print_grid(headers, table, out, left=2):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *table)] if table else [len(h) for h in headers]
    line = "  ".join(h.ljust(w) if i < left else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    print(line, file=out)
    print("-" * len(line), file=out)
    prev = None
    for row in table:
        if prev is not None and row[0] != prev:
            print(file=out)
        prev = row[0]
        print("  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))), file=out)
    out.flush()


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)
