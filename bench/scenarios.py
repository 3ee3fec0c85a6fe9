"""Scenarios: pgbench runs (parsed) and the idle-connections memory test."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import resource
import subprocess
import time

from .cluster import BENCH_DB, BENCH_ROLE, PgCluster
from .targets import Target
from .util import log

BIGRESULT_SQL = "SELECT repeat('x', 1000) FROM generate_series(1, 1000);\n"


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    args: tuple[str, ...] = ()       # pgbench options besides -c/-j/-T
    clients: int = 10
    threads: int = 2
    script: str | None = None         # custom script text (written to a file, passed with -f)
    expect_fail: tuple[str, ...] = () # targets through which this scenario is expected to fail
    kind: str = "pgbench"             # or "idle"
    note: str = ""
    sslmode: str = "disable"          # the clients' libpq sslmode (poolers get client TLS when not disable)
    unix: bool = False                # the clients connect over the target's unix socket (pgbench -h <dir>)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("select-c10", ("-S",), 10),
    Scenario("select-c50", ("-S",), 50),
    Scenario("select-connect-c10", ("-S", "-C"), 10, note="new connection (and login) per transaction"),
    Scenario("tpcb-c20", (), 20),
    Scenario("extended-c20", ("-S", "-M", "extended"), 20,
             note="extended protocol, unnamed statements (Parse/Bind/Execute/Sync per query)"),
    Scenario("prepared-c20", ("-S", "-M", "prepared"), 20, expect_fail=("pgbouncer", "pgbouncer-reset"),
             note="named prepared statements (PgBouncer 1.18 has no max_prepared_statements)"),
    Scenario("bigresult-c4", (), 4, script=BIGRESULT_SQL, note="~1 MB result per transaction"),
    Scenario("idle-1000", kind="idle", clients=1000, note="1000 logged-in idle clients"),
    Scenario("select-tls-c10", ("-S",), 10, sslmode="require", expect_fail=("direct",),
             note="sslmode=require: TLS from pgbench to the pooler (plain text on to the server; "
                  "the bench server has no TLS, so direct fails)"),
    Scenario("select-unix-c10", ("-S",), 10, unix=True, expect_fail=("pypool", "pyrelay"),
             note="clients over the pooler's unix socket (pgbench -h <socket dir>); compare with select-c10 "
                  "(TCP); the pooler reaches PostgreSQL over TCP in both"),
)}
DEFAULT_SCENARIOS = tuple(SCENARIOS)
QUICK_SCENARIOS = ("select-c10",)


def expected_to_fail(sc: Scenario, target: str, overrides: set[tuple[str, str]] = frozenset()) -> bool:
    """Whether a failure of sc through target is expected (not an error of the bench run):
    the scenario's own list, plus --expect-fail TARGET:SCENARIO overrides."""
    return target in sc.expect_fail or (target, sc.name) in overrides


# ---------------------------------------------------------------- pgbench

_TPS_RE = re.compile(r"^tps = ([0-9.]+)(?: \((.*)\))?", re.M)
_NUM_RE = {
    "transactions": re.compile(r"^number of transactions actually processed: (\d+)", re.M),
    "failed": re.compile(r"^number of failed transactions: (\d+)", re.M),
    "latency_ms": re.compile(r"^latency average = ([0-9.]+) ms", re.M),
    "latency_stddev_ms": re.compile(r"^latency stddev = ([0-9.]+) ms", re.M),
    "conn_time_ms": re.compile(r"^(?:initial|average) connection time = ([0-9.]+) ms", re.M),
}
_ERROR_RE = re.compile(r"(error|fatal|aborted|could not|failed)", re.I)


def parse_pgbench(output: str) -> dict:
    """tps (excluding connection time where pgbench reports that separately),
    mean latency, transactions and failed transactions from pgbench's summary."""
    res: dict = {}
    tps_lines = _TPS_RE.findall(output)
    chosen = None
    for value, label in tps_lines:
        if "without initial connection" in label or "excluding connections" in label:
            chosen = (value, label)
            break
    if chosen is None and tps_lines:
        chosen = tps_lines[0]
    if chosen:
        res["tps"] = float(chosen[0])
        res["tps_label"] = chosen[1]
    for key, rx in _NUM_RE.items():
        m = rx.search(output)
        if m:
            res[key] = float(m.group(1)) if "." in m.group(1) or key.endswith("_ms") else int(m.group(1))
    return res


def first_error_line(output: str) -> str | None:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("pgbench: error", "pgbench: fatal")):
            return line[:300]
    for line in lines:
        if _ERROR_RE.search(line) and not line.startswith("number of failed"):
            return line[:300]
    return None


def pgbench_argv(cluster: PgCluster, target: Target, sc: Scenario, duration: float,
                 script_path: str | None) -> list[str]:
    # Over the unix socket: the target's socket directory (a target without one fails the run clearly).
    host = (target.unix_dir or "/nonexistent-unix-socket-dir") if sc.unix else "127.0.0.1"
    argv = [cluster.bin("pgbench"), "-h", host, "-p", str(target.port), "-U", BENCH_ROLE,
            "-n", "-T", str(int(round(duration))), "-c", str(sc.clients), "-j", str(sc.threads)]
    argv += list(sc.args)
    if script_path:
        argv += ["-f", script_path]
    argv.append(BENCH_DB)
    return argv


def run_pgbench(cluster: PgCluster, target: Target, sc: Scenario, duration: float,
                script_path: str | None, cpus: set[int] | None = None) -> dict:
    """One pgbench run against a target, with pooler/server/client CPU deltas."""
    argv = pgbench_argv(cluster, target, sc, duration, script_path)
    rec: dict = {"scenario": sc.name, "target": target.name, "argv": argv[1:], "duration": duration}
    with open("/proc/loadavg") as f:
        rec["loadavg_1m_before"] = float(f.read().split()[0])
    cluster.settle()
    srv0 = cluster.cpu_seconds()
    pool0 = target.cpu_seconds() if target.is_pooler else None
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, env=dict(cluster.client_env(), PGSSLMODE=sc.sslmode),
                           timeout=duration + 120, stdin=subprocess.DEVNULL,
                           preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        out, rc = p.stdout + "\n" + p.stderr, p.returncode
    except subprocess.TimeoutExpired as exc:
        out = ((exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")) + \
              ((exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or ""))
        out += "\npgbench: error: bench timeout (pgbench did not finish)"
        rc = -1
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    pool1 = target.cpu_seconds() if target.is_pooler else None
    cluster.settle()
    srv1 = cluster.cpu_seconds()
    rec["wall_s"] = round(wall, 3)
    rec["returncode"] = rc
    rec.update(parse_pgbench(out))
    txns = rec.get("transactions") or 0
    if pool0 is not None and pool1 is not None:
        rec["pooler_cpu_s"] = round(pool1 - pool0, 3)
        if txns:
            rec["pooler_us_per_txn"] = round((pool1 - pool0) * 1e6 / txns, 2)
    if srv0 is not None and srv1 is not None:
        rec["server_cpu_s"] = round(srv1 - srv0, 3)
        if txns:
            rec["server_us_per_txn"] = round((srv1 - srv0) * 1e6 / txns, 2)
    client_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    rec["client_cpu_s"] = round(client_cpu, 3)
    if txns:
        rec["client_us_per_txn"] = round(client_cpu * 1e6 / txns, 2)
    st = target.status() if target.is_pooler else {}
    if st:
        rec["pooler_rss_kb"] = st.get("VmRSS")
        rec["pooler_threads"] = st.get("Threads")
    err = first_error_line(out) if (rc != 0 or "error" in out.lower() or "aborted" in out.lower()) else None
    if rc != 0 or "tps" not in rec or err:
        rec["status"] = "failed"
        rec["error"] = err or f"pgbench exited with status {rc}"
        rec["output_tail"] = "\n".join(out.strip().splitlines()[-25:])
    else:
        rec["status"] = "ok"
    if not target.alive():
        rec["status"] = "failed"
        rec["error"] = f"{target.name} process died during the run"
    return rec


# ---------------------------------------------------------------- bigresult size

def bigresult_bytes(cluster: PgCluster) -> dict:
    """Bytes one bigresult transaction moves: measured payload, plus the wire size
    (simple-protocol messages: RowDescription, DataRows, CommandComplete, ReadyForQuery)."""
    import psycopg
    with psycopg.connect(host="127.0.0.1", port=cluster.port, user=BENCH_ROLE, dbname=BENCH_DB,
                         password=cluster.password, sslmode="disable") as conn:
        rows = conn.execute(BIGRESULT_SQL.strip().rstrip(";")).fetchall()
    payload = sum(len(r[0].encode()) for r in rows)
    # DataRow: type(1) + len(4) + nfields(2) + per field len(4) + data
    wire = sum(1 + 4 + 2 + 4 + len(r[0].encode()) for r in rows)
    wire += 1 + 4 + 2 + (len("repeat") + 1 + 4 + 2 + 4 + 2 + 4 + 2)     # RowDescription
    wire += 1 + 4 + len("SELECT 1000") + 1                                 # CommandComplete
    wire += 1 + 4 + 1                                                      # ReadyForQuery
    return {"rows": len(rows), "payload_bytes": payload, "wire_bytes": wire}


# ---------------------------------------------------------------- idle clients

def run_idle(cluster: PgCluster, target: Target, n_clients: int, idle_seconds: float,
             connect_timeout: float = 600.0, workers: int = 16) -> dict:
    """Open n logged-in idle client connections; measure the pooler's RSS and CPU while idle."""
    import psycopg
    rec: dict = {"scenario": "idle-%d" % n_clients, "target": target.name, "clients": n_clients,
                 "idle_seconds": idle_seconds}
    st0 = target.status()
    rec["rss_before_kb"] = st0.get("VmRSS")
    rec["threads_before"] = st0.get("Threads")
    conns: list = []
    errors: list[str] = []

    def one(_):
        return psycopg.connect(host="127.0.0.1", port=target.port, user=BENCH_ROLE, dbname=BENCH_DB,
                               password=cluster.password, sslmode="disable", gssencmode="disable",
                               connect_timeout=int(connect_timeout), autocommit=True)

    t0 = time.monotonic()
    cpu0 = target.cpu_seconds()
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as ex:
            futs = [ex.submit(one, i) for i in range(n_clients)]
            for f in concurrent.futures.as_completed(futs):
                try:
                    conns.append(f.result())
                except Exception as exc:          # noqa: BLE001 - report, don't crash
                    errors.append(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
        rec["connect_s"] = round(time.monotonic() - t0, 2)
        cpu1 = target.cpu_seconds()
        if cpu0 is not None and cpu1 is not None:
            rec["login_cpu_s"] = round(cpu1 - cpu0, 3)
            if conns:
                rec["login_cpu_us_per_client"] = round((cpu1 - cpu0) * 1e6 / len(conns), 1)
        rec["connected"] = len(conns)
        rec["connect_errors"] = len(errors)
        if errors:
            rec["first_error"] = errors[0][:300]
        # check they really work (one query through a handful of them)
        for c in conns[:5]:
            c.execute("SELECT 1").fetchone()
        time.sleep(1.0)                            # let the pooler settle
        st1 = target.status()
        cpu_a = target.cpu_seconds()
        time.sleep(idle_seconds)
        cpu_b = target.cpu_seconds()
        st2 = target.status()
        rec["rss_idle_kb"] = st2.get("VmRSS")
        rec["threads_idle"] = st2.get("Threads")
        rec["rss_after_connect_kb"] = st1.get("VmRSS")
        if cpu_a is not None and cpu_b is not None:
            rec["idle_cpu_ms"] = round((cpu_b - cpu_a) * 1e3, 1)
        if rec.get("rss_idle_kb") and rec.get("rss_before_kb") and conns:
            rec["rss_per_client_kb"] = round((rec["rss_idle_kb"] - rec["rss_before_kb"]) / len(conns), 1)
        # all still there?
        alive = 0
        for c in conns[:20]:
            try:
                c.execute("SELECT 1").fetchone()
                alive += 1
            except Exception:                      # noqa: BLE001
                pass
        rec["probe_ok"] = f"{alive}/{min(20, len(conns))}"
    finally:
        for c in conns:
            try:
                c.close()
            except Exception:                      # noqa: BLE001
                pass
    if not target.alive():
        rec["status"] = "failed"
        rec["error"] = f"{target.name} process died"
    elif errors and not conns:
        rec["status"] = "failed"
        rec["error"] = errors[0][:300]
    elif errors:
        rec["status"] = "partial"
        rec["error"] = f"{len(errors)} of {n_clients} logins failed; first: {errors[0][:200]}"
    else:
        rec["status"] = "ok"
    log(f"idle {target.name}: {rec.get('connected')} connected in {rec.get('connect_s')} s, "
        f"RSS {rec.get('rss_before_kb')} -> {rec.get('rss_idle_kb')} kB, idle CPU {rec.get('idle_cpu_ms')} ms")
    return rec


def write_scripts(workdir: str) -> dict[str, str]:
    """Custom pgbench script files, by scenario name."""
    paths = {}
    for sc in SCENARIOS.values():
        if sc.script:
            path = os.path.join(workdir, f"{sc.name}.sql")
            with open(path, "w") as f:
                f.write(sc.script)
            os.chmod(path, 0o644)
            paths[sc.name] = path
    return paths
