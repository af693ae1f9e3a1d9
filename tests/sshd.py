"""A real OpenSSH server on 127.0.0.1 for the remote-storage tests, with throwaway keys.

The server is Debian's ``sshd`` (package ``openssh-server``; ``.ci/run`` installs it) started in the
foreground with its own config, host key and authorized key in a temporary folder; nothing in
``/etc/ssh`` is read or changed. SFTP (all DVC's ``ssh`` remote uses) is sshd's ``internal-sftp``.

Who logs in: run as root (CI), sshd logs the client in as ``nobody``, a real unprivileged account, so a
folder it may not write is really unwritable (root ignores permission bits); run as another user, that
user is the only one sshd can log in, and permission bits hold for it already.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SSHD_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
READY_TIMEOUT_S = 30.0
PORT_ATTEMPTS = 5


def find_sshd() -> str | None:
    return shutil.which("sshd", path=SSHD_SEARCH_PATH)


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick; the caller retries if it is taken later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SshServer:
    """``sshd -D`` on 127.0.0.1; ``url(path)`` is a DVC ``ssh://`` remote URL for a folder it serves.

    ``root`` is a world-traversable temporary folder: the host key, the client key (``client_key``, what
    ``dvc remote modify --local <name> keyfile`` points at), ``known_hosts`` for OpenSSH's client (the
    login check; DVC's ssh remote checks no host key) and the folders the remotes live in
    (``storage(name)``).
    """

    def __init__(self) -> None:
        sshd = find_sshd()
        if sshd is None:
            raise RuntimeError("sshd not found: install Debian's openssh-server (.ci/run does)")
        self.sshd = sshd
        self.user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        login = pwd.getpwnam(self.user)
        self.uid, self.gid = login.pw_uid, login.pw_gid
        # Not pytest's tmp_path: that is 0700 and the login user could not reach its folders.
        self.root = Path(tempfile.mkdtemp(prefix="ctdiff-sshd-"))
        self.root.chmod(0o755)
        self.client_key = self.root / "client_key"
        self.known_hosts = self.root / "known_hosts"
        self._keygen(self.root / "host_key")
        self._keygen(self.client_key)
        authorized = self.root / "authorized_keys"
        authorized.write_text((self.root / "client_key.pub").read_text())
        authorized.chmod(0o644)  # sshd reads it as the login user
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log = self.root / "sshd.log"

    def _keygen(self, path: Path) -> None:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ctdiff-tests", "-f", str(path)],
                       check=True, capture_output=True)

    def _config(self, port: int) -> Path:
        config = self.root / "sshd_config"
        config.write_text("\n".join([
            "ListenAddress 127.0.0.1",
            f"Port {port}",
            f"HostKey {self.root / 'host_key'}",
            f"PidFile {self.root / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            f"AllowUsers {self.user}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",  # the key files live in a temporary folder, not in the user's ~/.ssh
            "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE",
            "",
        ]))
        return config

    def start(self) -> SshServer:
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> SshServer:
        if os.geteuid() == 0:
            # sshd's privilege-separation folder; the package's service unit makes it, `sshd -D` does not.
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        errors = []
        for _ in range(PORT_ATTEMPTS):
            port = free_port()
            config = self._config(port)
            check = subprocess.run([self.sshd, "-t", "-f", str(config)], capture_output=True, text=True)
            if check.returncode != 0:
                raise RuntimeError(f"sshd rejects its test config: {check.stderr.strip()}")
            with self.log.open("w") as log:
                self.proc = subprocess.Popen([self.sshd, "-D", "-e", "-f", str(config)],
                                             stdout=log, stderr=subprocess.STDOUT)
            if self._wait_ready(port):
                self.port = port
                host_key = (self.root / "host_key.pub").read_text().split()
                self.known_hosts.write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
                self._check_login()
                return self
            errors.append(f"port {port}: {self.log.read_text().strip()[-400:]}")
        raise RuntimeError("sshd did not start:\n" + "\n".join(errors))

    def _wait_ready(self, port: int) -> bool:
        """True once sshd answers with its SSH banner; False if it exited (e.g. the port was taken)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                    if sock.recv(64).startswith(b"SSH-2.0-"):
                        return True
            except OSError:
                time.sleep(0.1)  # not listening yet: poll again until the deadline
        self.stop()
        raise RuntimeError(f"sshd on port {port} did not answer within {READY_TIMEOUT_S:.0f} s:\n"
                           f"{self.log.read_text()[-1000:]}")

    def _check_login(self) -> None:
        """One SFTP session with OpenSSH's own client, so a refused login is reported here, with sshd's
        reason (e.g. a locked account: without PAM sshd refuses one even for a key), not inside DVC."""
        sftp = shutil.which("sftp")
        if sftp is None:
            return
        batch = self.root / "sftp-batch"
        batch.write_text("pwd\n")
        check = subprocess.run([sftp, "-b", str(batch), "-i", str(self.client_key), "-P", str(self.port),
                                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "BatchMode=yes",
                                "-o", "IdentitiesOnly=yes", f"{self.user}@127.0.0.1"],
                               capture_output=True, text=True, timeout=60)
        if check.returncode != 0:
            self.stop()
            raise RuntimeError(f"sshd on port {self.port} refused {self.user}: {check.stderr.strip()}\n"
                               f"sshd: {self.log.read_text()[-1000:]}")

    def storage(self, name: str) -> Path:
        """A folder under the server's root for a remote, owned by the login user."""
        path = self.root / name
        path.mkdir()
        os.chown(path, self.uid, self.gid)
        return path

    @staticmethod
    def read_only(path: Path) -> None:
        """Take the write bits off a remote's folder and everything in it: the login user (never root) can
        read what is there and write nothing, as with a team's remote one may only pull from."""
        for folder, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                item = Path(folder) / name
                item.chmod(item.stat().st_mode & ~0o222)
        path.chmod(path.stat().st_mode & ~0o222)

    def url(self, path: Path) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def close(self) -> None:
        self.stop()
        for folder, _, _ in os.walk(self.root):  # read-only remotes: a non-root owner must write to delete
            Path(folder).chmod(0o755)
        shutil.rmtree(self.root, ignore_errors=True)
