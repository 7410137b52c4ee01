"""The ``ssh -R`` path of the benchmark: our own sshd on 127.0.0.1 and ssh clients with remote forwards.

Nothing of the machine's ssh setup is used or changed: a temporary directory
holds a freshly generated host key, a freshly generated client key (its public
half is the only authorized key), the sshd_config and sshd's pid file; sshd
runs in the foreground (``-D -e``) on a free port and logs to the run's log.
Each ssh client is ``ssh -N -R 127.0.0.1:FWD:127.0.0.1:BACKEND ... user@127.0.0.1``
for the current user; when root, sshd's privilege-separation directory
(``/run/sshd``) is created if it is missing (Debian's sshd refuses to start
without it).  Every process is started pinned, through ``Procs``, and stopped
by PID with the rest of the run.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
from pathlib import Path

from common import BenchError, Procs, descendants, log, log_tail, poll, tool_version

SSHD_PATHS = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


def find_sshd() -> str | None:
    found = shutil.which("sshd")
    if found:
        return str(Path(found).resolve())
    return next((p for p in SSHD_PATHS if Path(p).exists()), None)


def unavailable() -> str | None:
    """Why the ssh path cannot run here (None when it can)."""
    missing = [tool for tool in ("ssh", "ssh-keygen") if not shutil.which(tool)]
    if not find_sshd():
        missing.insert(0, "sshd")
    if missing:
        return (f"{', '.join(missing)} not installed (Debian: apt-get install openssh-server openssh-client; "
                f"bench/run.sh does it when run as root)")
    return None


def version() -> str:
    return tool_version(["ssh", "-V"])


def _accepts(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


class SshPath:
    """One sshd and the ssh clients connected to it."""

    def __init__(self, procs: Procs, pin: list[str], tmp: Path) -> None:
        self.procs, self.pin = procs, pin
        self.dir = tmp / "ssh"
        self.dir.mkdir(mode=0o700)
        self.user = getpass.getuser()
        self.key = self.dir / "client_key"
        self.sshd_name: str | None = None

    def _keygen(self, path: Path) -> None:
        out = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tunneld-bench", "-f", str(path)],
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise BenchError(f"ssh-keygen failed: {out.stderr.strip()}")

    def start_sshd(self, port: int) -> None:
        sshd = find_sshd()
        assert sshd is not None
        self._keygen(self.dir / "host_key")
        self._keygen(self.key)
        authorized = self.dir / "authorized_keys"
        shutil.copyfile(self.key.with_suffix(".pub"), authorized)
        config = self.dir / "sshd_config"
        config.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {self.dir / 'host_key'}
AuthorizedKeysFile {authorized}
PidFile {self.dir / 'sshd.pid'}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
GatewayPorts no
X11Forwarding no
PrintMotd no
LogLevel INFO
""")
        if os.geteuid() == 0 and not Path("/run/sshd").exists():
            log("creating sshd's privilege-separation directory /run/sshd")
            Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        check = subprocess.run([sshd, "-t", "-f", str(config)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise BenchError(f"sshd -t refused the config: {check.stderr.strip()}")
        self.sshd_name = "sshd"
        self.procs.start("sshd", self.pin + [sshd, "-D", "-e", "-f", str(config)])
        poll(lambda: _accepts(port), f"sshd on 127.0.0.1:{port}", self.procs, 20)

    def connect(self, name: str, port: int, forwards: list[tuple[int, int]]) -> None:
        """``ssh -N`` to our sshd (via ``port``) with ``-R 127.0.0.1:FWD:127.0.0.1:BACKEND`` per pair."""
        argv = self.pin + ["ssh", "-N", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                           "-o", "UserKnownHostsFile=/dev/null", "-o", "ExitOnForwardFailure=yes",
                           "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-i", str(self.key), "-p", str(port)]
        for fwd, backend in forwards:
            argv += ["-R", f"127.0.0.1:{fwd}:127.0.0.1:{backend}"]
        self.procs.start(name, argv + [f"{self.user}@127.0.0.1"])
        for fwd, _ in forwards:
            poll(lambda: _accepts(fwd), f"{name}: forward 127.0.0.1:{fwd}", self.procs, 30)

    def server_pids(self) -> list[int]:
        """sshd's listener and its per-connection children."""
        if not self.sshd_name or not self.procs.has(self.sshd_name):
            return []
        pid = self.procs.pid(self.sshd_name)
        return [pid] + descendants(pid)

    def sshd_log(self) -> str:
        return log_tail(self.procs.logs.get("sshd", self.dir / "none"))
