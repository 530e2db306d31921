"""Credentials and commands for a real federation: TLS + SuperNode authentication under Flower's
deployment engine.

``python -m lordba_fl.federation.deploy init --out deploy --host 192.168.1.10 --nodes 3`` writes

* ``ca.crt`` / ``ca.key``: a private certificate authority (keep ``ca.key`` offline);
* ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, whose subject
  alternative names are every ``--host`` (IP addresses and DNS names) plus ``localhost``;
* ``nodes/node-<i>`` / ``nodes/node-<i>.pub``: one ECDSA P-384 key pair per SuperNode (OpenSSH
  format, what ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
  read); each device gets only its own private key and ``ca.crt``;
* ``commands.sh``: the exact commands for the SuperLink, the registrations, every SuperNode and
  ``flwr run``, in order.

Runtime dependency installation stays off everywhere (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``,
the SuperLink's ``--disable-runtime-dependency-installation``; Flower 1.41 SuperNodes install nothing
unless started with ``--allow-runtime-dependency-installation``): devices run the environment they
were provisioned with.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_PORT = 8000  # flower-superlink's HTTP port (Fleet, Control)
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def _private_dir(folder: Path) -> None:
    """``folder`` (and missing parents) created, and the folder itself made owner-only (0700): it holds keys."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """``data`` to ``path`` through a fresh, randomly named file in the same folder (``mkstemp``:
    ``O_CREAT | O_EXCL``, mode 0600 from the first byte, so a planted file or symlink is never written
    through), then renamed over ``path``; a public file is made 0644 before the rename."""
    if private:
        _private_dir(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not private:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lordba-fl"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for h in dict.fromkeys([*hosts, "localhost"]):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            entries.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(entries)


def _check_host(h: str) -> str:
    h = h.strip()
    if not h or (any(c in h for c in " /:@") and not _is_ip(h)):
        raise ValueError(f"--host {h!r} is not an IP address or DNS name; pass the address SuperNodes dial, e.g. 192.168.1.10")
    return h


def _is_ip(h: str) -> bool:
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        return False


def _cert(subject: str, issuer_key, issuer_name: x509.Name, public_key, days: int, ca: bool, hosts: list[str] | None = None):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    else:
        b = b.add_extension(_san(hosts or []), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_node_key(path: Path) -> Path:
    """An ECDSA P-384 SuperNode key pair: ``path`` (OpenSSH private) and ``path.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(path.with_name(path.name + ".pub"), pub + b"\n")
    return path


@dataclass
class Deployment:
    """Where a deployment's credentials live and how its parts are started."""

    root: Path
    host: str
    port: int
    nodes: int
    name: str = "lordba"
    bind: str = "0.0.0.0"  # the SuperLink's listening address (flower-superlink --host; its default is 127.0.0.1)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def node_key(self, i: int) -> Path:
        return self.root / "nodes" / f"node-{i}"

    def superlink_cmd(self) -> list[str]:
        r = self.root
        return ["flower-superlink", "--ssl-ca-certfile", str(r / "ca.crt"), "--ssl-certfile", str(r / "server.pem"),
                "--ssl-keyfile", str(r / "server.key"), "--enable-supernode-auth", "--host", self.bind,
                "--port", str(self.port),
                "--disable-runtime-dependency-installation"]

    def register_cmd(self, i: int) -> list[str]:
        return ["flwr", "supernode", "register", str(self.node_key(i)) + ".pub", self.name]

    def supernode_cmd(self, i: int, clientappio_port: int | None = None, rank: int | None = None) -> list[str]:
        """``rank``: the adapter rank this device trains (heterogeneous devices; default: the run's)."""
        node_config = f"partition-id={i}" + (f" rank={rank}" if rank is not None else "")
        return ["flower-supernode", "--root-certificates", str(self.root / "ca.crt"), "--superlink", self.address,
                "--auth-supernode-private-key", str(self.node_key(i)), "--node-config", node_config,
                "--port", str(clientappio_port or 9200 + i)]  # SuperNodes install nothing unless --allow-... is given

    def run_cmd(self, run_config: str = "") -> list[str]:
        cmd = ["flwr", "run", ".", self.name, "--stream"]
        return cmd + (["--run-config", run_config] if run_config else [])

    def flwr_connection(self) -> dict:
        """The ``[superlink.<name>]`` table for ``$FLWR_HOME/config.toml``."""
        return {"address": self.address, "root-certificates": str((self.root / "ca.crt").resolve())}

    def script(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in ENV.items())
        q = shlex.join
        lines = [
            "#!/usr/bin/env bash",
            "# lordba-fl federation with TLS and SuperNode authentication; run each block where it says.",
            f"export {env}",
            "",
            "# 1. the server machine: the SuperLink",
            q(self.superlink_cmd()) + " &",
            "",
            "# 2. your machine: a connection in $FLWR_HOME/config.toml (python -m lordba_fl.federation.deploy init ... --write-flwr-config did this)",
            f"#    [superlink.{self.name}] address = \"{self.address}\"  root-certificates = \"{self.flwr_connection()['root-certificates']}\"",
            "#    then allow each device's public key:",
            *[q(self.register_cmd(i)) for i in range(self.nodes)],
            "",
            "# 3. device i (it needs ca.crt and nodes/node-<i> only): its SuperNode",
            *[q(self.supernode_cmd(i)) + " &" for i in range(self.nodes)],
            "",
            "# 4. your machine, in the lordba-fl checkout: the run (clients-per-round <= number of devices)",
            q(self.run_cmd(f"clients-per-round={min(self.nodes, 4)}")),
            "",
        ]
        return "\n".join(lines)


def init_deployment(out: Path, hosts: list[str], nodes: int, port: int = DEFAULT_PORT, name: str = "lordba",
                    days: int = 365, force: bool = False, bind: str = "0.0.0.0") -> Deployment:
    """Create the CA, the SuperLink certificate (SANs: ``hosts`` + localhost) and ``nodes`` node keys."""
    if nodes < 1:
        raise ValueError(f"--nodes must be >= 1; got {nodes}")
    if not hosts:
        raise ValueError("pass at least one --host: the IP address or DNS name SuperNodes dial")
    hosts = [_check_host(h) for h in hosts]
    out = Path(out)
    if (out / "ca.key").exists() and not force:
        raise FileExistsError(f"{out}/ca.key exists; keep it (use 'add-node' for more devices) or pass --force to replace everything")
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _cert("lordba-fl CA", ca_key, _name("lordba-fl CA"), ca_key.public_key(), days, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = _cert(hosts[0], ca_key, ca.subject, server_key.public_key(), days, ca=False, hosts=hosts)
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _pem_key(server_key), private=True)
    _write(out / "server.pem", server.public_bytes(serialization.Encoding.PEM))
    _private_dir(out)
    dep = Deployment(out, hosts[0], port, nodes, name, _check_host(bind))
    for i in range(nodes):
        make_node_key(dep.node_key(i))
    _write(out / "commands.sh", dep.script().encode())
    (out / "commands.sh").chmod(0o755)
    return dep


def write_connection(dep: Deployment, flwr_home: str | None = None) -> Path:
    """Add ``[superlink.<name>]`` (address + root certificate) to ``$FLWR_HOME/config.toml``."""
    import tomli_w
    import tomllib

    home = Path(flwr_home or os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    path = home / "config.toml"
    doc = tomllib.loads(path.read_text()) if path.is_file() else {}
    doc.setdefault("superlink", {}).setdefault("default", dep.name)
    doc["superlink"][dep.name] = dep.flwr_connection()
    _write(path, tomli_w.dumps(doc).encode())
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lordba_fl.federation.deploy", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init", help="CA, SuperLink certificate, node keys and commands.sh")
    i.add_argument("--out", type=Path, default=Path("deploy"))
    i.add_argument("--host", action="append", required=True, help="address SuperNodes dial (repeat for more SANs)")
    i.add_argument("--nodes", type=int, default=2)
    i.add_argument("--port", type=int, default=DEFAULT_PORT)
    i.add_argument("--bind", default="0.0.0.0", help="address the SuperLink listens on (flower-superlink --host; "
                   "0.0.0.0: every interface, so SuperNodes on other machines can connect)")
    i.add_argument("--name", default="lordba", help="connection name in $FLWR_HOME/config.toml")
    i.add_argument("--days", type=int, default=365)
    i.add_argument("--force", action="store_true")
    i.add_argument("--write-flwr-config", action="store_true", help="add the connection to $FLWR_HOME/config.toml")
    a = sub.add_parser("add-node", help="one more node key pair")
    a.add_argument("--out", type=Path, default=Path("deploy"))
    args = p.parse_args(argv)
    if args.cmd == "add-node":
        nodes = args.out / "nodes"
        taken = {int(f.name.split("-")[1]) for f in nodes.glob("node-*") if not f.name.endswith(".pub")} if nodes.is_dir() else set()
        key = make_node_key(nodes / f"node-{max(taken, default=-1) + 1}")
        print(f"wrote {key} and {key}.pub; register it: flwr supernode register {key}.pub <connection>")
        return
    dep = init_deployment(args.out, args.host, args.nodes, args.port, args.name, args.days, args.force, args.bind)
    if args.write_flwr_config:
        print(f"wrote [superlink.{dep.name}] to {write_connection(dep)}")
    print(dep.script())


if __name__ == "__main__":
    main()
