"""python -m bench: PostgreSQL direct vs PgBouncer (plain and with server_reset_query_always)
vs threadpool_proxy (this tree, and optionally a base tree for before/after) with pgbench.

Everything runs on loopback in a throwaway temp dir; every process started is
stopped (and the temp dir removed) on exit, failure, SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile

import yaml

from . import report
from .cluster import PgCluster, ensure_packages, ensure_pg_user, server_version_string
from .scenarios import (DEFAULT_SCENARIOS, QUICK_SCENARIOS, SCENARIOS, bigresult_bytes, expected_to_fail, run_idle,
                        run_pgbench, write_scripts)
from .targets import (CALIBRATION_SCENARIOS, CALIBRATION_TARGETS, DEFAULT_CALIBRATION_DIR, PGBOUNCER_TARGETS, REPO_ROOT,
                      TARGET_NAMES, WORKERS_TARGET, CalibrationTarget, DirectTarget, PgBouncerTarget,
                      ProxyTarget, Target, is_target_name, make_tls_files, target_order)
from .util import BenchError, become_subreaper, log, parse_cpus, raise_nofile


class Interrupted(BaseException):
    pass


def _on_signal(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _kv(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key.strip(), val


def _target_scenario(value: str) -> list[tuple[str, str]]:
    pairs = []
    for item in _csv(value):
        t, sep, sc = item.partition(":")
        if not sep or not t.strip() or not sc.strip():
            raise argparse.ArgumentTypeError(f"expected TARGET:SCENARIO, got {item!r}")
        pairs.append((t.strip(), sc.strip()))
    return pairs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark PostgreSQL direct vs PgBouncer vs threadpool_proxy with pgbench "
                    "(throwaway cluster on loopback; all started processes are cleaned up).")
    p.add_argument("--targets", type=_csv, default=None,
                   help=f"comma list from {','.join(TARGET_NAMES)} (default: all; proxy-base only "
                        f"with --proxy-base-src), and proxy-wN: the proxy with `workers: N` (e.g. proxy-w2)")
    p.add_argument("--calibration-dir", metavar="DIR", default=DEFAULT_CALIBRATION_DIR,
                   help="where targets pypool and pyrelay (pypool.py, pyrelay.py: thinnest thread-per-client "
                        "pooling relay and plain relay, simple protocol only, select-c10/c50 only) live "
                        "(default: ../shared/calibration beside the repo)")
    p.add_argument("--pin-poolers", metavar="CPUS", default=None,
                   help="run PgBouncer and the proxy on these CPUs only (taskset syntax: 1, 0,2, 2-3)")
    p.add_argument("--pin-load", metavar="CPUS", default=None,
                   help="run PostgreSQL and pgbench on these CPUs only (e.g. 0; with --pin-poolers 1-3)")
    p.add_argument("--proxy-base-src", metavar="DIR", default=None,
                   help="source tree of an older threadpool_proxy (e.g. `git worktree add /tmp/tpp-base HEAD~1`): "
                        "adds target proxy-base, run with DIR on PYTHONPATH and the same config as proxy, "
                        "for before/after comparisons in one run")
    p.add_argument("--expect-fail", type=_target_scenario, action="append", default=[],
                   metavar="TARGET:SCENARIO",
                   help="a failure of SCENARIO through TARGET is expected (reported, exit status stays 0); "
                        "comma list, repeatable; e.g. proxy:prepared-c20 while the proxy lacks a feature. "
                        "Built in: prepared-c20 through pgbouncer and pgbouncer-reset")
    p.add_argument("--scenarios", type=_csv, default=None,
                   help=f"comma list from {','.join(SCENARIOS)} or 'all' (default: all)")
    p.add_argument("--duration", type=float, default=None, help="seconds per pgbench run (default 10)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per scenario, targets interleaved (default 3)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10)")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: --duration 2 --rounds 1 --scenarios select-c10 --scale 1 unless given")
    p.add_argument("--json", metavar="PATH", help="write raw results as JSON here")
    p.add_argument("--proxy-auth", choices=("passthrough", "scram-sha-256"), default="passthrough",
                   help="threadpool_proxy auth_type (scram-sha-256 writes an auth_file with the role's verifier)")
    p.add_argument("--proxy-config-extra", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="extra threadpool_proxy YAML setting (VALUE parsed as YAML; dotted keys nest), repeatable; "
                        "e.g. --proxy-config-extra \"reset_query=''\"")
    p.add_argument("--pgbouncer-config-extra", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="extra [pgbouncer] ini setting, repeatable")
    p.add_argument("--pool-size", type=int, default=20, help="server pool size of both poolers (default 20)")
    p.add_argument("--max-client-conn", type=int, default=2000, help="max_client_conn of both poolers (default 2000)")
    p.add_argument("--idle-clients", type=int, default=1000, help="clients for the idle-* scenario (default 1000)")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="idle measurement window (default 10)")
    p.add_argument("--tmpdir", default=None, help="parent of the temp dir (default: $TMPDIR or /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs) after the run")
    p.add_argument("--list", action="store_true", help="list scenarios and exit")
    a = p.parse_args(argv)

    if a.proxy_base_src is not None:
        a.proxy_base_src = os.path.realpath(a.proxy_base_src)
        if not os.path.isfile(os.path.join(a.proxy_base_src, "threadpool_proxy", "__init__.py")):
            p.error(f"--proxy-base-src: {a.proxy_base_src} has no threadpool_proxy/__init__.py "
                    f"(give the root of a source tree)")
    if a.targets is None:
        a.targets = [t for t in TARGET_NAMES if (t != "proxy-base" or a.proxy_base_src)
                     and t not in CALIBRATION_TARGETS]
    bad = [t for t in a.targets if not is_target_name(t)]
    if bad or not a.targets:
        p.error(f"--targets: unknown {','.join(bad) or '(empty)'}; choose from {','.join(TARGET_NAMES)}, proxy-wN")
    if "proxy-base" in a.targets and not a.proxy_base_src:
        p.error("--targets: proxy-base needs --proxy-base-src DIR")
    a.targets = target_order(a.targets)      # canonical order
    for opt in ("pin_poolers", "pin_load"):
        if getattr(a, opt) is not None:
            try:
                cpus = parse_cpus(getattr(a, opt))
            except ValueError:
                p.error(f"--{opt.replace('_', '-')}: expected CPUs as taskset takes them (1, 0,2, 2-3)")
            if not cpus <= os.sched_getaffinity(0):
                p.error(f"--{opt.replace('_', '-')}: CPUs {sorted(cpus)} are not all available "
                        f"(this process may use {sorted(os.sched_getaffinity(0))})")
            setattr(a, opt, cpus)
    if a.scenarios is None or a.scenarios == ["all"]:
        a.scenarios = list(QUICK_SCENARIOS if a.quick else DEFAULT_SCENARIOS)
    bad = [s for s in a.scenarios if s not in SCENARIOS]
    if bad:
        p.error(f"--scenarios: unknown {','.join(bad)}; choose from {','.join(SCENARIOS)}")
    if a.quick:
        a.duration = 2.0 if a.duration is None else a.duration
        a.rounds = 1 if a.rounds is None else a.rounds
        if "--scale" not in (argv if argv is not None else sys.argv[1:]):
            a.scale = 1
    a.duration = 10.0 if a.duration is None else a.duration
    a.rounds = 3 if a.rounds is None else a.rounds
    if a.duration < 1 or a.rounds < 1 or a.scale < 1:
        p.error("--duration, --rounds and --scale must be >= 1")
    pairs = {pair for group in a.expect_fail for pair in group}
    bad = [f"{t}:{s}" for t, s in sorted(pairs) if not is_target_name(t) or s not in SCENARIOS]
    if bad:
        p.error(f"--expect-fail: unknown target or scenario in {','.join(bad)}; targets {','.join(TARGET_NAMES)}, "
                f"scenarios {','.join(SCENARIOS)}")
    a.expect_fail = sorted(pairs)
    try:
        a.proxy_config_extra = [(k, yaml.safe_load(v) if v != "" else "") for k, v in a.proxy_config_extra]
    except yaml.YAMLError as exc:
        p.error(f"--proxy-config-extra: value is not valid YAML: {exc}")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for sc in SCENARIOS.values():
            what = " ".join(sc.args) if sc.kind == "pgbench" else "idle connections"
            fails = f" [expected to fail through {', '.join(sc.expect_fail)}]" if sc.expect_fail else ""
            print(f"{sc.name:20} {what} {'-f script' if sc.script else ''} {sc.note}{fails}")
        return 0

    # SIGINT explicitly too: a shell starting us in the background leaves it ignored
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    nofile = raise_nofile()
    become_subreaper()

    cluster: PgCluster | None = None
    targets: list[Target] = []
    workdir = None
    exit_code = 0
    try:
        bindir, bouncer_exe = ensure_packages(any(t in PGBOUNCER_TARGETS for t in args.targets))
        os_user = ensure_pg_user()
        workdir = tempfile.mkdtemp(prefix="tpbench-", dir=args.tmpdir)
        os.chmod(workdir, 0o755)          # the postgres OS user must reach its subdirectories
        log(f"work dir {workdir}")
        scripts = write_scripts(workdir)

        cluster = PgCluster(workdir, bindir, os_user, args.scale)
        cluster.cpus = args.pin_load
        cluster.start()
        cluster.setup_bench_db()
        tls = (make_tls_files(workdir, os_user)
               if any(SCENARIOS[s].sslmode != "disable" for s in args.scenarios) else None)

        for name in args.targets:
            if name == "direct":
                t: Target = DirectTarget(cluster)
            elif name in CALIBRATION_TARGETS:
                t = CalibrationTarget(cluster, name, args.calibration_dir, args.pool_size, cpus=args.pin_poolers)
            elif name in PGBOUNCER_TARGETS:
                t = PgBouncerTarget(cluster, bouncer_exe, workdir, os_user, args.pool_size,
                                    args.max_client_conn, args.pgbouncer_config_extra,
                                    name=name, reset_always=(name == "pgbouncer-reset"), tls=tls,
                                    cpus=args.pin_poolers)
            else:
                workers = WORKERS_TARGET.match(name)
                t = ProxyTarget(cluster, workdir, args.proxy_auth, args.pool_size, args.max_client_conn,
                                args.proxy_config_extra, name=name,
                                src=args.proxy_base_src if name == "proxy-base" else REPO_ROOT, tls=tls,
                                workers=int(workers.group(1)) if workers else 1, cpus=args.pin_poolers)
            targets.append(t)
            try:
                t.start()
            except BenchError as exc:
                t.failed = str(exc)
                exit_code = 1
                log(f"target {name} unavailable: {exc}")

        bouncer_t = next((t for t in targets if t.name in PGBOUNCER_TARGETS), None)
        info = report.machine_info(cluster.version, bouncer_t.version() if bouncer_t else None,
                                   cluster.bin("pgbench"))
        info["postgres"] = server_version_string(bindir)
        proxy_t = next((t for t in targets if t.name == "proxy"), None)
        for t in targets:
            if isinstance(t, ProxyTarget):
                info[t.name] = t.version() + (" [UNAVAILABLE]" if t.failed else "")
        settings = {
            "targets": ", ".join(f"{t.name}:{t.port}" if not t.failed else f"{t.name}:UNAVAILABLE"
                                 for t in targets),
            "scenarios": ", ".join(args.scenarios),
            "duration/rounds": f"{args.duration:g} s x {args.rounds} rounds (targets interleaved, order rotated per round)",
            "pgbench scale": args.scale,
            "postgres": "fsync=off synchronous_commit=off full_page_writes=off max_connections=300 (NOT durable)",
            "poolers": f"transaction mode, pool size {args.pool_size}, max_client_conn {args.max_client_conn}",
            "resets": "pgbouncer: none (transaction mode); pgbouncer-reset: server_reset_query_always=1 "
                      "(DISCARD ALL on every release); proxy: reset_query "
                      f"{proxy_reset_query(args.proxy_config_extra)!r} when a server connection passes "
                      "to another client",
            "proxy auth": args.proxy_auth + (f"; extra {args.proxy_config_extra}" if args.proxy_config_extra else ""),
            "pgbench": "-n (no vacuum), -j 2, sslmode=disable, SCRAM password login",
            "shared CPU": f"pgbench, pooler and postgres all share these {info['nproc']} CPUs",
            "RLIMIT_NOFILE": nofile,
            "pinning": (f"poolers on CPUs {sorted(args.pin_poolers) if args.pin_poolers else 'any'}, PostgreSQL and "
                        f"pgbench on {sorted(args.pin_load) if args.pin_load else 'any'}"),
            "work dir": workdir,
        }
        if args.pgbouncer_config_extra:
            settings["pgbouncer extra"] = args.pgbouncer_config_extra
        if args.proxy_base_src:
            settings["proxy-base src"] = f"{args.proxy_base_src} (same config as proxy)"
        exp = [f"{t}:{s}" for s in args.scenarios for t in args.targets
               if SCENARIOS[s].kind == "pgbench" and expected_to_fail(SCENARIOS[s], t, set(args.expect_fail))]
        if exp:
            settings["expected to fail"] = ", ".join(exp)
        report.print_machine(info, settings)

        big = None
        if any(SCENARIOS[s].script and "bigresult" in s for s in args.scenarios):
            big = bigresult_bytes(cluster)
            log(f"bigresult: {big['rows']} rows, {big['payload_bytes']} payload bytes, "
                f"{big['wire_bytes']} wire bytes per transaction")

        runs: list[dict] = []
        idle: list[dict] = []
        for sc_name in args.scenarios:
            sc = SCENARIOS[sc_name]
            if sc.kind == "idle":
                for t in targets:
                    if not usable(t):
                        continue
                    if not t.is_pooler:
                        log(f"{sc.name}: skipping {t.name} (max_connections 300; only poolers are measured)")
                        continue
                    log(f"{sc.name}: {t.name}: opening {args.idle_clients} idle clients")
                    rec = run_idle(cluster, t, args.idle_clients, args.idle_seconds)
                    rec["scenario"] = sc.name
                    idle.append(rec)
                    if rec["status"] == "failed":
                        exit_code = 1
                continue
            for rnd in range(args.rounds):
                avail = [t for t in targets if usable(t)]
                if not avail:
                    break
                k = rnd % len(avail)
                for t in avail[k:] + avail[:k]:
                    if not usable(t) or (t.name in CALIBRATION_TARGETS and sc.name not in CALIBRATION_SCENARIOS):
                        continue
                    rec = run_pgbench(cluster, t, sc, args.duration, scripts.get(sc.name), cpus=args.pin_load)
                    rec["round"] = rnd + 1
                    rec["expected_to_fail"] = expected_to_fail(sc, t.name, set(args.expect_fail))
                    runs.append(rec)
                    progress(rec, args.rounds)
                    if not t.alive():
                        t.failed = t.death_note()
                        log(t.failed)
                        exit_code = 1
                    elif rec["status"] != "ok" and not rec["expected_to_fail"]:
                        exit_code = 1

        with open("/proc/loadavg") as f:
            info["loadavg_at_end"] = " ".join(f.read().split()[:3])
        print(f"\nloadavg at start {info['loadavg_at_start']}, at end {info['loadavg_at_end']} "
              f"(other work on this machine skews results)\n")
        rows = report.summarize(runs, [s for s in args.scenarios if SCENARIOS[s].kind == "pgbench"],
                                [t.name for t in targets], big)
        report.print_table(rows)
        report.print_comparison(rows)
        report.print_idle_table(idle)
        unavailable = [t for t in targets if t.failed]
        for t in unavailable:
            print(f"\ntarget {t.name} UNAVAILABLE: {t.failed}")
        if args.json:
            report.write_json(args.json, {
                "machine": info, "settings": {k: str(v) for k, v in settings.items()},
                "args": {k: v for k, v in vars(args).items()},
                "bigresult": big, "runs": runs, "summary": rows, "idle": idle,
                "unavailable": {t.name: t.failed for t in unavailable},
                "proxy_config": proxy_t.config if proxy_t is not None else None,
            })
            log(f"raw results written to {args.json}")
    except BenchError as exc:
        log(f"error: {exc}")
        exit_code = 2
    except (KeyboardInterrupt, Interrupted) as exc:
        log(f"interrupted ({exc or 'SIGINT'}); cleaning up")
        exit_code = 130
    finally:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)      # let the cleanup finish
        cleanup(targets, cluster, workdir, args.keep)
    return exit_code


def usable(t: Target) -> bool:
    return not t.failed and t.alive()


def proxy_reset_query(extra: list[tuple[str, object]]) -> str:
    for key, value in extra:
        if key == "reset_query":
            return str(value)
    return "DISCARD ALL"


def progress(rec: dict, rounds: int) -> None:
    bits = [f"{rec['scenario']} r{rec['round']}/{rounds} {rec['target']:15}"]
    if "tps" in rec:
        bits.append(f"tps {rec['tps']:9.1f}")
    if "latency_ms" in rec:
        bits.append(f"lat {rec['latency_ms']:.3f} ms")
    if "pooler_us_per_txn" in rec:
        bits.append(f"pooler {rec['pooler_us_per_txn']:.1f} us/tx")
    if "server_us_per_txn" in rec:
        bits.append(f"server {rec['server_us_per_txn']:.1f} us/tx")
    if rec["status"] != "ok":
        bits.append(f"FAILED{' (expected)' if rec.get('expected_to_fail') else ''}: {rec.get('error')}")
    log("  ".join(bits))


def cleanup(targets: list[Target], cluster: PgCluster | None, workdir: str | None, keep: bool) -> None:
    for t in reversed(targets):
        try:
            t.stop()
        except Exception as exc:                  # noqa: BLE001 - keep cleaning
            log(f"stopping {t.name}: {exc}")
    if cluster is not None:
        try:
            cluster.stop()
        except Exception as exc:                  # noqa: BLE001
            log(f"stopping postgres: {exc}")
    if workdir:
        if keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        sys.exit(1)
