"""``--demo``: a throwaway PostgreSQL from this machine's own binaries, for trying the proxy.

It initialises a cluster in a temporary directory (as the ``postgres`` OS user
when run as root, since PostgreSQL refuses to run as root), requires
SCRAM-SHA-256 on TCP, creates the role ``demo`` (password ``demo``) and the
database ``demo``, and removes everything again on stop.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile


def find_bindir() -> str:
    """The directory of initdb/pg_ctl: ``pg_config --bindir`` or the newest /usr/lib/postgresql/*/bin."""
    env = os.environ.get("PG_BINDIR")
    if env and os.path.exists(os.path.join(env, "pg_ctl")):
        return env
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if os.path.exists(os.path.join(out, "pg_ctl")):
            return out
    except (OSError, subprocess.CalledProcessError):
        pass
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                        key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    if candidates:
        return os.path.dirname(candidates[-1])
    found = shutil.which("pg_ctl")
    if found:
        return os.path.dirname(os.path.realpath(found))
    raise RuntimeError("PostgreSQL server binaries not found (install the 'postgresql' package)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DemoCluster:
    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.tmp = None
        self.datadir = None
        self.port = None
        self.run_as = None

    def _cmd(self, *argv: str) -> list[str]:
        if self.run_as:
            return ["runuser", "-u", self.run_as, "--", *argv]
        return list(argv)

    def start(self) -> dict:
        self.tmp = tempfile.mkdtemp(prefix="threadpool_proxy_demo_")
        self.datadir = os.path.join(self.tmp, "data")
        if os.geteuid() == 0:
            self.run_as = "postgres"
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
                pw = pwd.getpwnam("postgres")
            os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
        pwfile = os.path.join(self.tmp, "pw")
        with open(pwfile, "w") as f:
            f.write("postgres\n")
        if self.run_as:
            os.chown(pwfile, pwd.getpwnam(self.run_as).pw_uid, -1)
        self.port = free_port()
        subprocess.run(self._cmd(os.path.join(self.bindir, "initdb"), "-D", self.datadir, "-U", "postgres",
                                 "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
                                 "-E", "UTF8", "--no-locale"),
                       check=True, capture_output=True)
        os.unlink(pwfile)
        with open(os.path.join(self.datadir, "postgresql.conf"), "a") as f:
            f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.tmp}'\npassword_encryption = 'scram-sha-256'\n")
        subprocess.run(self._cmd(os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir, "-w", "-l",
                                 os.path.join(self.tmp, "postgres.log"), "start"), check=True, capture_output=True)
        subprocess.run(self._cmd(os.path.join(self.bindir, "psql") if os.path.exists(os.path.join(self.bindir, "psql"))
                                 else "psql", "-h", self.tmp, "-p", str(self.port), "-U", "postgres",
                                 "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q",
                                 "-c", "CREATE ROLE demo LOGIN PASSWORD 'demo'",
                                 "-c", "CREATE DATABASE demo OWNER demo"),
                       check=True, capture_output=True)
        return {"listen": {"host": "127.0.0.1", "port": 6432}, "pool_mode": "transaction", "pool_size": 10,
                "databases": {"*": {"host": "127.0.0.1", "port": self.port}}}

    def banner(self, proxy_port: int) -> str:
        return (f"threadpool_proxy demo: PostgreSQL on 127.0.0.1:{self.port}, proxy on 127.0.0.1:{proxy_port} "
                f"(transaction mode)\n"
                f"connect with:  PGPASSWORD=demo psql -h 127.0.0.1 -p {proxy_port} -U demo demo\n"
                f"stop with Ctrl-C (the demo cluster is deleted)")

    def stop(self) -> None:
        if self.datadir and os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
            subprocess.run(self._cmd(os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir, "-m", "fast", "-w",
                                     "stop"), capture_output=True)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
