"""A real federation on loopback: SuperLink with TLS and SuperNode authentication, two registered
SuperNodes, two rounds on the tiny model; an unregistered SuperNode is refused. Every process the
test starts is ended by PID, also when the test fails."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from lordba_fl.federation.deploy import init_deployment, write_connection

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.real_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_credentials_match_what_flower_reads(tmp_path):
    dep = init_deployment(tmp_path, ["127.0.0.1", "fl.example.org"], nodes=2)
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    for i in range(2):
        key = load_ssh_private_key(dep.node_key(i).read_bytes(), None)
        pub = load_ssh_public_key((dep.node_key(i).parent / f"node-{i}.pub").read_bytes())
        assert key.curve.name == "secp384r1" and key.public_key() == pub
        assert dep.node_key(i).stat().st_mode & 0o077 == 0  # private keys readable by the owner only
    with pytest.raises(FileExistsError, match="pass --force"):
        init_deployment(tmp_path, ["127.0.0.1"], nodes=1)
    with pytest.raises(ValueError, match="not an IP address or DNS name"):
        init_deployment(tmp_path / "x", ["http://bad/"], nodes=1)


def test_keys_are_private_from_the_first_byte_and_planted_links_are_not_followed(tmp_path):
    out = tmp_path / "deploy"
    out.mkdir(mode=0o755)
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (out / "ca.key.tmp").symlink_to(victim)  # the old predictable temporary name
    dep = init_deployment(out, ["127.0.0.1"], nodes=1)
    assert victim.read_text() == "untouched"
    assert out.stat().st_mode & 0o777 == 0o700 and (out / "nodes").stat().st_mode & 0o777 == 0o700
    for key in (out / "ca.key", out / "server.key", dep.node_key(0)):
        assert key.stat().st_mode & 0o777 == 0o600 and not key.is_symlink()
    assert (out / "ca.crt").stat().st_mode & 0o777 == 0o644
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    # the SuperLink listens where SuperNodes on other machines can reach it (its own default is 127.0.0.1)
    cmd = dep.superlink_cmd()
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert "deploy/" in (ROOT / ".gitignore").read_text().split()


class Procs:
    """Started processes, each with its log; :meth:`end` kills them all by PID."""

    def __init__(self, log_dir: Path, env: dict):
        self.log_dir, self.env, self.procs = log_dir, env, {}

    def start(self, name: str, cmd: list[str], cwd: Path = ROOT) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("w")
        cmd = [str(BIN / cmd[0]), *cmd[1:]]
        p = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def end(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # the process and what it spawned (ClientApp / ServerApp)
                except ProcessLookupError:
                    pass
                p.wait(timeout=30)


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"superlink exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"superlink did not listen on {port} in {timeout} s")


def test_tls_authenticated_federation_on_loopback(tmp_path):
    home = tmp_path / "flwr-home"
    # the SuperLink and SuperNodes start flower-superexec by name: the environment's bin/ must be on PATH
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONPATH=str(ROOT),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    port = _free_port()
    dep = init_deployment(tmp_path / "creds", ["127.0.0.1"], nodes=3, port=port, name="tlsfed")
    write_connection(dep, str(home))
    procs = Procs(tmp_path, env)
    out = tmp_path / "results"
    try:
        _wait_port(port, procs.start("superlink", dep.superlink_cmd(), cwd=tmp_path))
        for i in (0, 1):  # node 2 stays unregistered
            r = subprocess.run([str(BIN / "flwr"), *dep.register_cmd(i)[1:]], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
        for i in range(3):  # two device tiers: node 1 trains rank 2 of the run's rank-4 adapter (nested)
            procs.start(f"supernode-{i}", dep.supernode_cmd(i, clientappio_port=_free_port(), rank=2 if i == 1 else None))
        run_config = (f"model='tiny-llama' rounds=2 clients-per-round=2 rank=4 alpha=8.0 train.local-steps=2 "
                      f"train.batch-size=2 train.seq-len=48 eval.examples=6 eval.generate=0 "
                      f"data.shakespeare.max-clients=2 out-dir='{out}' name='tls'")
        r = subprocess.run([str(BIN / "flwr"), *dep.run_cmd(run_config)[1:]], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        rows = [json.loads(x) for x in (out / "tls" / "rounds.jsonl").read_text().splitlines()]
        # the unregistered node was refused: the SuperLink knows no such key, the node gives up (exit code 305)
        link = procs.log("superlink")
        assert "No SuperNode found with the given public key" in link
        assert "Failed to activate SuperNode" in procs.log("supernode-2")
        assert link.count("[Fleet.ActivateNode] Activated node_id=") == 2
    finally:
        procs.end()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients_succeeded"] == 2 and r["tier_mix"] == "2:1,4:1" for r in rows[1:])
    assert (out / "tls" / "adapter.lordba.safetensors").is_file() and (out / "tls" / "ckpt-2.safetensors").is_file()
    _check_bytes(rows, run_config)


def _check_bytes(rows: list[dict], run_config: str) -> None:
    """Round 1's downlink is version 0, which every party derives from the seed (sent to the rank-4 node
    as a delta against its own seeded version 0: it builds it in another process and decodes it exactly;
    to the rank-2 node as its tier's full state): rebuild both here and compare the logged bytes exactly."""
    from flwr.common.config import parse_config_args

    from lordba_fl.base.models import load_model
    from lordba_fl.methods import make_method
    from lordba_fl.runconfig import DEFAULTS, parse_run_config

    cfg = parse_run_config({**DEFAULTS, **parse_config_args([run_config])})
    method = make_method(cfg)
    model = method.adapt(load_model(cfg.model, cfg.quant)[0])
    method.init_server(model)
    seeded = len(method.downlink(node_id=1, server_round=1))
    method.note_rank(2, 2)
    tier2 = len(method.downlink(node_id=2, server_round=1))
    assert tier2 != seeded and rows[1]["down_payload_sum"] == seeded + tier2
    for r in rows[1:]:
        # Flower's wire bytes carry the payload plus a small per-message envelope
        assert r["up_payload_sum"] > 0 and r["up_payload_sum"] <= r["up_wire_sum"] <= r["up_payload_sum"] + 2 * 2048
        assert r["down_payload_sum"] <= r["down_wire_sum"] <= r["down_payload_sum"] + 2 * 2048
