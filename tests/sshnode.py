"""Machines for `ray up` on this one: OpenSSH servers in namespaces of their own.

Ray's `local` provider reaches its nodes over SSH and runs ray_cluster.yaml's commands
there, `ray stop` among them; `ray stop` ends every Ray process it can see, which on a
shared machine includes other tests' clusters, and the head's fixed ports (6379, 8265,
52365, 5000, ...) may be held by another Ray here. So each node is a set of namespaces:

- network: its own address on a bridge (10.213.N.0/24, the gateway .1 is this machine),
  its own loopback and ports, a default route (Ray finds its node address by it). The
  head's dashboard and MLflow listen on the head's loopback, reached through SSH
  tunnels, as on AWS; other nodes reach the head's GCS at its address;
- PID (with its own /proc): `ray stop` sees only the node's processes, and ending the
  node's first process ends everything the node started, as terminating an instance
  would;
- mount: its own /tmp (Ray's session files, the autoscaler's state) and its own home at
  one path shared by every node (the file mounts and commands use the same paths on
  every node, as /home/ubuntu on AWS), root's home in the node's /etc/passwd (/root
  itself holds this machine's Python).

Needs root (namespaces, links, an sshd logging in as root), Debian's openssh-server and
rsync: `.ci/run` installs them; elsewhere `missing()` says what is absent."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def missing() -> str | None:
    """Why SSH nodes cannot be made on this machine, or None."""
    if os.geteuid() != 0:
        return "SSH nodes need root (namespaces, network links, an sshd logging in as root); CI runs as root"
    for tool in (SSHD, "rsync", "ssh", "ssh-keygen", "unshare", "ip"):
        if not shutil.which(tool):
            return f"{tool} is not installed (.ci/run installs openssh-server, rsync and iproute2)"
    out = subprocess.run(["unshare", "--net", "--pid", "--mount", "--fork", "--mount-proc", "true"],
                         capture_output=True)
    if out.returncode != 0:
        return f"cannot make network, PID and mount namespaces here: {out.stderr.decode().strip()}"
    return None


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


def keypair(folder: Path) -> Path:
    key = folder / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ray-up-test", "-f", str(key)], check=True)
    return key


@contextlib.contextmanager
def network():
    """A bridge on a /24 no route here uses yet; yields {"bridge", "prefix", "gateway", "home"}:
    node i gets prefix.(i+2), and "home" is the path every node has its home at."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    used = [ipaddress.ip_network(w, strict=False) for w in routes.split() if "/" in w]
    while True:
        n = random.randrange(1, 255)
        net = ipaddress.ip_network(f"10.213.{n}.0/24")
        if not any(net.overlaps(u) for u in used) and not Path(f"/sys/class/net/vgb{n}").exists():
            break
    bridge, prefix = f"vgb{n}", f"10.213.{n}"
    home = Path(tempfile.mkdtemp(prefix="vgghome-", dir="/var/tmp"))  # the mount point; empty outside
    _ip("link", "add", bridge, "type", "bridge")
    try:
        _ip("addr", "add", f"{prefix}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        yield {"bridge": bridge, "prefix": prefix, "gateway": f"{prefix}.1", "home": home}
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def node_venv(home: Path, inside: Path) -> None:
    """The node's image comes with the pinned packages already installed (here: this
    venv's), so the setup commands' `pip install -c constraints.txt ...` finds every
    requirement satisfied and installs only the project itself, into ~/venv. ~/venv is a
    venv of its own that sees this one's packages through a .pth file: nothing the setup
    commands install reaches this venv."""
    venv = home / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    here = sysconfig.get_paths()["purelib"]
    [site] = list(venv.glob("lib/python*/site-packages"))
    (site / "zz_machine_image.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    # the image's console scripts (pip, ray, ...), run by the node's interpreter, named
    # by the path the node sees its home at (`inside`)
    for script in Path(sys.executable).parent.iterdir():
        head = script.read_bytes()[:200] if script.is_file() else b""
        if head.startswith(b"#!") and b"python" in head.split(b"\n")[0] and not (venv / "bin" / script.name).exists():
            body = script.read_text().split("\n", 1)[1]
            (venv / "bin" / script.name).write_text(f"#!{inside / 'venv' / 'bin' / 'python'}\n{body}")
            (venv / "bin" / script.name).chmod(0o755)
    activate = venv / "bin" / "activate"
    activate.write_text(activate.read_text().replace(str(venv), str(inside / "venv")))
    # and this machine's package sources (a node here has no route to the internet):
    # pip's settings from its config files and PIP_* variables, which the node's own
    # HOME and sshd's environment would not carry; no retries, so a missing package
    # fails at once instead of after minutes of name lookups
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    settings = {}
    for line in listed.splitlines():
        name, _, value = line.partition("=")
        if name.startswith(("global.", ":env:.")):
            settings[name.split(".", 1)[1]] = value.strip("'\"")
    settings.update(retries="0", timeout="15")
    (home / ".config" / "pip").mkdir(parents=True)
    (home / ".config" / "pip" / "pip.conf").write_text(
        "[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))


@contextlib.contextmanager
def ssh_node(net: dict, index: int, key: Path, log: Path):
    """Node `index` of `net`: an sshd on its address, port 22, logging in as root with
    `key`. Yields {"ip", "home" (its home, as this machine sees it), "pid"}."""
    ip, ns = f"{net['prefix']}.{index + 2}", f"{net['bridge']}n{index}"
    base = Path(tempfile.mkdtemp(prefix=f"vggnode{index}-", dir="/var/tmp"))  # not under /tmp, which the node hides
    home, tmp, etc = base / "home", base / "tmp", base / "etc"
    for d in (home / ".ssh", tmp, etc):
        d.mkdir(parents=True)
    tmp.chmod(0o1777)
    shutil.copy(f"{key}.pub", home / ".ssh" / "authorized_keys")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(etc / "host_key")], check=True)
    (etc / "sshd_config").write_text(
        f"ListenAddress {ip}:22\nHostKey {etc / 'host_key'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"AuthorizedKeysFile {home / '.ssh' / 'authorized_keys'}\nPidFile none\nMaxStartups 50\n"
        "MaxSessions 50\n")
    # root's home on this node: its own folder, at the path every node shares. Through
    # the node's own /etc/passwd, since ssh expands `~` (Ray's ~/ray_bootstrap_key.pem,
    # which the head's autoscaler uses to reach the workers) from there, not from HOME.
    (etc / "passwd").write_text("".join(
        ":".join(f[:5] + [str(net["home"])] + f[6:]) + "\n" if f[0] == "root" else line + "\n"
        for line in Path("/etc/passwd").read_text().splitlines() for f in [line.split(":")]))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    host_end, node_end = f"{net['bridge']}h{index}", f"{net['bridge']}v{index}"
    _ip("netns", "add", ns)
    proc = None
    try:
        _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
        _ip("link", "set", host_end, "master", net["bridge"], "up")
        _ip("link", "set", node_end, "netns", ns)
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", node_end)
        _ip("-n", ns, "link", "set", node_end, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "default", "via", net["gateway"])
        script = (f"mount --bind {home} {net['home']} && mount --bind {tmp} /tmp && "
                  f"mount --bind {etc / 'passwd'} /etc/passwd && "
                  # sshd is not the namespace's first process: that one reaps the orphans
                  # Ray's double-forked daemons leave
                  f"{SSHD} -D -e -f {etc / 'sshd_config'} & wait")
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--pid", "--mount", "--fork",
                                     "--mount-proc", "--propagation", "private", "bash", "-c", script],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection((ip, 22), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd for node {ip} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield {"ip": ip, "home": home, "pid": proc.pid}
    finally:
        if proc is not None:
            # `unshare --fork` waits for the namespace's first process; killing that one
            # makes the kernel end every process in the namespace
            for child in _children(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            proc.wait(timeout=60)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # its end of the link goes with it
        shutil.rmtree(base, ignore_errors=True)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def processes_in(pid: int) -> list[str]:
    """Command lines of every process in the node whose `unshare` is `pid`."""
    kids = _children(pid)
    if not kids:
        return []
    out = subprocess.run(["nsenter", "--target", str(kids[0]), "--pid", "--mount", "ps", "-eo", "args="],
                         capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.strip() and not line.startswith("ps ")]
