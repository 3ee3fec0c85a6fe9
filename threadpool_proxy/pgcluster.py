"""A throwaway PostgreSQL cluster from this machine's own binaries.

One implementation for the three places that need a real server for a while:
``--demo`` (:mod:`threadpool_proxy.demo`), the tests' ``pg`` fixture
(tests/conftest.py) and the benchmark (bench/cluster.py).  They differ only in
the pg_hba lines, the settings and what they create once the server is up.

Standard library only: psycopg is a test dependency, not the package's, so
SQL is run with ``psql`` over the unix socket (:meth:`PgCluster.sql`).

Why it works the way it does:

* PostgreSQL refuses to run as root.  When we are root every server-side
  command (initdb, pg_ctl, psql) runs as the ``postgres`` OS user, created
  with useradd if missing, through runuser (or su where there is no runuser),
  and the cluster directory is given to that user.
* Everything lives in one fresh temporary directory (data directory, log,
  unix socket), removed again by :meth:`PgCluster.stop`, also when starting
  failed half-way.  Its path is kept short because a unix socket path is
  limited to about 107 bytes.
* TCP logins need scram-sha-256 by default (``local`` is trust, so the
  superuser can administer over the socket without a password); the server
  listens on 127.0.0.1 only, on a free port, trying another one when the port
  was taken between choosing and binding it.
* fsync, synchronous_commit and full_page_writes are off: the data is thrown
  away, and initdb/start/checkpoints are much faster without durability.
* pg_ctl start runs in a new session: a Ctrl-C at the terminal reaches only
  our process, which then stops the server itself, in order, and removes its
  directory (the postmaster would otherwise shut down under our feet and a
  killed parent would leave it running).
* stop() uses ``pg_ctl stop``; should that fail it signals the one postmaster
  PID named in postmaster.pid (SIGQUIT, then SIGKILL), after checking that
  this process really runs in our data directory.  Nothing is killed by name.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

OS_USER = "postgres"        # the OS user the server runs as when we are root
SUPERUSER = "postgres"      # the cluster's superuser role (initdb -U)

DEFAULT_HBA = (
    "local  all  all                 trust",
    "host   all  all  127.0.0.1/32   scram-sha-256",
    "host   all  all  ::1/128        scram-sha-256",
)

# Settings every throwaway cluster gets (callers' settings override them).
THROWAWAY_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}

MAX_DIR_LEN = 60            # leaves room for "/.s.PGSQL.NNNNN" within the ~107-byte socket path limit
START_ATTEMPTS = 5          # free ports tried when the chosen one turns out to be taken


class PgClusterError(RuntimeError):
    """A step of setting up or running the cluster failed.

    ``str()`` is one line (fit for a command line's error message);
    ``output`` holds the command's stdout/stderr and the tail of the server log.
    """

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


# -- finding things -------------------------------------------------------------

def _has_tools(bindir: str, need) -> bool:
    return all(os.access(os.path.join(bindir, name), os.X_OK) for name in need)


def _version_key(bindir: str) -> tuple:
    """(15,) for /usr/lib/postgresql/15/bin, () when the directory name is no version."""
    m = re.search(r"/postgresql/([0-9.]+)/bin/?$", bindir)
    return tuple(int(x) for x in m.group(1).split(".") if x) if m else ()


def find_bindir(need=("initdb",)) -> str:
    """The directory of PostgreSQL's server programs, holding every program in ``need``.

    In this order: PG_BINDIR, ``pg_config --bindir``, the newest
    /usr/lib/postgresql/<version>/bin (Debian/Ubuntu install several side by
    side, none of them on PATH), and last the directory of ``initdb`` on PATH.
    A candidate lacking a program in ``need`` is passed over.  Raises
    RuntimeError saying what to do when none fits.
    """
    env = os.environ.get("PG_BINDIR")
    if env and _has_tools(env, need):
        return env
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _has_tools(out, need):
            return out
    candidates = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if _has_tools(d, need)]
    if candidates:
        return max(candidates, key=_version_key)
    found = shutil.which(need[0])
    if found:
        bindir = os.path.dirname(os.path.realpath(found))   # /usr/local/bin/initdb may be a symlink
        if _has_tools(bindir, need):
            return bindir
    ignored = f"PG_BINDIR={env} lacks one of them; " if env else ""
    raise RuntimeError(f"PostgreSQL server programs ({', '.join(need)}) not found: {ignored}"
                       f"install the 'postgresql' package or set PG_BINDIR")


def find_tool(name: str) -> str | None:
    """An admin tool (useradd, runuser, su) that may live in an sbin directory missing from PATH."""
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}", f"/usr/bin/{name}", f"/bin/{name}")
         if os.access(p, os.X_OK)), None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now.

    Someone may take it before the caller binds it; callers that cannot
    bind atomically retry (as :meth:`PgCluster.start` does).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ensure_os_user(name: str = OS_USER) -> str:
    """Create the OS user ``name`` (a system user without home or shell) if it does not exist."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run([find_tool("useradd") or "useradd", "--system", "--user-group", "--no-create-home",
                        "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                       check=True, capture_output=True, timeout=60)
    return name


def _quote_setting(value) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited; collects it first if it is our child (we may be its subreaper)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    try:    # a zombie someone else has not collected yet has exited too
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


# -- the cluster ----------------------------------------------------------------

class PgCluster:
    """A PostgreSQL cluster in a temporary directory: ``start()``, use it, ``stop()``.

    Also a context manager (``with PgCluster() as pg:``).  Attributes once
    started: ``host``, ``port``, ``bindir``, ``tmpdir``, ``datadir``,
    ``sockdir`` (= ``tmpdir``), ``logfile``, ``postmaster_pid``, ``run_as``
    (the OS user commands run as, None when not root).

    ``hba``: the pg_hba.conf lines (default :data:`DEFAULT_HBA`).
    ``settings``: postgresql.auto.conf settings on top of
    :data:`THROWAWAY_SETTINGS` (listen_addresses, port,
    unix_socket_directories and password_encryption are always set).
    ``prefix``/``parent``: the temporary directory's name prefix and the
    directory to create it in (default: $TMPDIR, or /tmp when that path is
    too long for a unix socket).  ``keep_dir``: stop() leaves the directory
    (for a caller that removes its own parent directory, or keeps it for a
    post-mortem).
    """

    def __init__(self, *, bindir: str | None = None, hba=DEFAULT_HBA, settings: dict | None = None,
                 prefix: str = "tpp-pg-", parent: str | None = None, keep_dir: bool = False,
                 host: str = "127.0.0.1") -> None:
        self.bindir = bindir or find_bindir()
        self.hba = tuple(hba)
        self.settings = {**THROWAWAY_SETTINGS, **(settings or {})}
        self.prefix = prefix
        self.parent = parent
        self.keep_dir = keep_dir
        self.host = host
        self.port: int | None = None
        self.run_as: str | None = None
        self.tmpdir: str | None = None
        self.datadir: str | None = None
        self.sockdir: str | None = None
        self.logfile: str | None = None
        self.postmaster_pid: int | None = None
        self._stop_lock = threading.Lock()
        self._stopped = False

    def __enter__(self) -> "PgCluster":
        if self.tmpdir is None:
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def bin(self, name: str) -> str:
        """The path of a PostgreSQL program in ``bindir``."""
        return os.path.join(self.bindir, name)

    # ---- running commands ----

    def run(self, argv, *, what: str | None = None, check: bool = True, timeout: float = 120,
            **popen_kw) -> subprocess.CompletedProcess:
        """Run a server-side command (as ``run_as`` when we are root) in the cluster directory.

        PG* variables of our environment are left out (a PGHOST or PGDATA
        must not redirect initdb, pg_ctl or psql) and the C locale is used.
        Output is captured as text; with ``check`` a non-zero exit raises
        PgClusterError naming ``what`` (default: the program's name).
        """
        cmd = [str(a) for a in argv]
        if self.run_as:
            runuser = find_tool("runuser")
            if runuser:
                cmd = [runuser, "-u", self.run_as, "--", *cmd]
            else:
                cmd = [find_tool("su") or "su", "-s", "/bin/sh", self.run_as, "-c", shlex.join(cmd)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        proc = subprocess.run(cmd, cwd=self.tmpdir, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, **popen_kw)
        if check and proc.returncode != 0:
            raise self._error(what or os.path.basename(str(argv[0])), proc)
        return proc

    def _error(self, what: str, proc: subprocess.CompletedProcess, detail: str = "") -> PgClusterError:
        detail = detail or _last_line(proc.stderr) or _last_line(proc.stdout)
        return PgClusterError(f"{what} failed (exit status {proc.returncode})" + (f": {detail}" if detail else ""),
                              f"{proc.stdout}\n{proc.stderr}\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the server log, headed ``--- postgres.log ---`` ("" if none)."""
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                return "--- postgres.log ---\n" + "".join(f.readlines()[-n:])
        except (OSError, TypeError):
            return ""

    def sql(self, *statements: str, dbname: str = "postgres") -> str:
        """Run statements as the superuser over the unix socket with psql; returns its output (-At).

        Each statement is its own ``-c``, so each runs in its own transaction
        (CREATE DATABASE may not run inside one) but all in one session (a
        SET holds for the statements after it).  Stops at the first error
        (PgClusterError).
        """
        psql = self.bin("psql")
        if not os.access(psql, os.X_OK):
            psql = shutil.which("psql") or psql
        argv = [psql, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", self.sockdir, "-p", self.port,
                "-U", SUPERUSER, "-d", dbname]
        for statement in statements:
            argv += ["-c", statement]
        return self.run(argv, what=f"psql {statements[0][:40]!r}" if statements else "psql").stdout.strip()

    # ---- life cycle ----

    def start(self, preexec_fn=None) -> "PgCluster":
        """initdb, write pg_hba.conf and postgresql.auto.conf, pg_ctl start.

        ``preexec_fn`` runs in the child before pg_ctl (e.g. to raise its
        RLIMIT_NOFILE, inherited by the server).  On failure everything is
        stopped and removed again before the error (PgClusterError) propagates.
        """
        if self.tmpdir is not None:
            raise RuntimeError("PgCluster.start() called twice")
        try:
            if os.geteuid() == 0:
                self.run_as = ensure_os_user()
            self._make_dir()
            self.run([self.bin("initdb"), "-D", self.datadir, "-U", SUPERUSER, "-E", "UTF8", "--no-locale",
                      "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"])
            self._write_conf("pg_hba.conf", [f"# written by {__name__}", *self.hba])
            self._start_server(preexec_fn)
        except BaseException:
            self.stop()
            raise
        return self

    def _make_dir(self) -> None:
        d = tempfile.mkdtemp(prefix=self.prefix, dir=self.parent)
        if len(d) > MAX_DIR_LEN and self.parent is None:
            os.rmdir(d)
            d = tempfile.mkdtemp(prefix=self.prefix, dir="/tmp")
        self.tmpdir = self.sockdir = d
        self.datadir = os.path.join(d, "data")
        self.logfile = os.path.join(d, "postgres.log")
        os.chmod(d, 0o700)
        self._give_to_run_as(d)

    def _give_to_run_as(self, path: str) -> None:
        if self.run_as:
            pw = pwd.getpwnam(self.run_as)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _write_conf(self, name: str, lines) -> None:
        path = os.path.join(self.datadir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        self._give_to_run_as(path)

    def _start_server(self, preexec_fn) -> None:
        for _attempt in range(START_ATTEMPTS):
            self.port = free_port(self.host)
            settings = {"listen_addresses": self.host, "port": self.port,
                        "unix_socket_directories": self.sockdir, "password_encryption": "scram-sha-256",
                        **self.settings}
            self._write_conf("postgresql.auto.conf", [f"# written by {__name__}"]
                             + [f"{k} = {_quote_setting(v)}" for k, v in settings.items()])
            proc = self.run([self.bin("pg_ctl"), "-D", self.datadir, "-l", self.logfile, "-w", "-t", "60",
                             "start"], check=False, start_new_session=True, preexec_fn=preexec_fn)
            if proc.returncode == 0:
                self.postmaster_pid = self._pid_from_file()
                return
            # pg_ctl itself only says "Examine the log output": the reason is in the log
            fatal = [line for line in self.log_tail().splitlines() if "FATAL:" in line or "PANIC:" in line]
            error = self._error("pg_ctl start", proc, detail=fatal[-1].strip() if fatal else "")
            if "in use" not in error.output and "could not bind" not in error.output:
                break
        raise error

    def _pid_from_file(self) -> int | None:
        try:
            with open(os.path.join(self.datadir, "postmaster.pid"), encoding="ascii") as f:
                return int(f.readline().strip())
        except (OSError, ValueError, TypeError):
            return None

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (pg_ctl ``mode``: fast or immediate) and remove the directory.

        Safe to call more than once, and before or after a failed start.
        """
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            stopped = False
            if self.datadir and os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
                try:
                    stopped = self.run([self.bin("pg_ctl"), "-D", self.datadir, "-m", mode, "-w", "-t", "30",
                                        "stop"], check=False, timeout=60).returncode == 0
                except (OSError, subprocess.SubprocessError):
                    pass
            pid = self._pid_from_file() or self.postmaster_pid
            if pid is not None:
                self._end_postmaster(pid, signal_it=not stopped)
        finally:
            if self.tmpdir and not self.keep_dir:
                shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _end_postmaster(self, pid: int, signal_it: bool) -> None:
        """Make sure the postmaster ``pid`` is gone (and collected, when it is our child).

        After a good ``pg_ctl stop`` it is, or is about to be.  Otherwise
        (``signal_it``, or still there after a while) SIGQUIT (immediate
        shutdown), then SIGKILL, but only if that PID still runs in our data
        directory (the postmaster chdirs there), so that a reused PID is left alone.
        """
        steps = ((signal.SIGQUIT, 10), (signal.SIGKILL, 5))
        for sig, wait in steps if signal_it else ((None, 5), *steps):
            if sig is not None:
                if not self._is_our_postmaster(pid):
                    return
                try:
                    os.kill(pid, sig)
                except OSError:
                    return
            deadline = time.monotonic() + wait
            while not _process_gone(pid):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                return

    def _is_our_postmaster(self, pid: int) -> bool:
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except FileNotFoundError:
            return not os.path.isdir("/proc/self")    # gone, or no /proc to ask
        except OSError:
            return True                               # not allowed to look: kill() decides
        return os.path.realpath(cwd) == os.path.realpath(self.datadir)
