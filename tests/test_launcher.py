import pytest

from simulations.run import backend_resources, check_ray_address, write_flwr_federation


def test_federation_config_is_written_where_flower_reads_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "1.2.3.4:9093"\n')
    write_flwr_federation("sim100", supernodes=100, cpus_per_client=1.0, gpus_per_client=0.0)
    from flwr.cli.flower_config import read_superlink_connection

    conn = read_superlink_connection("sim100")  # Flower's own parser
    assert conn.options.num_supernodes == 100
    assert conn.options.backend.client_resources.num_cpus == 1.0
    assert conn.options.backend.client_resources.num_gpus == 0.0
    assert read_superlink_connection("x").address == "1.2.3.4:9093"  # other connections kept


def test_a_ray_cluster_brings_its_own_resources(tmp_path):
    client, init = backend_resources(1, 0.25, ray_address="10.0.0.1:6379")
    # joining a cluster: no local CUDA check, and no CPU / GPU counts (Ray refuses them there)
    assert client == {"num_cpus": 1, "num_gpus": 0.25} and init == {"address": "10.0.0.1:6379"}
    write_flwr_federation("cluster", supernodes=8, cpus_per_client=1.0, gpus_per_client=0.25,
                          flwr_home=str(tmp_path), ray_address="10.0.0.1:6379")
    import tomllib

    backend = tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]["cluster"]["options"]["backend"]
    assert backend == {"client-resources": {"num-cpus": 1, "num-gpus": 0.25}}


def test_a_missing_ray_cluster_is_refused_at_once():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match="no Ray cluster answers at 127.0.0.1:.*ray start --head"):
        check_ray_address(f"127.0.0.1:{port}")
    with pytest.raises(ValueError, match="must be host:port"):
        check_ray_address("10.0.0.1")


def test_bad_resources_name_the_fix():
    with pytest.raises(ValueError, match="cpus-per-client"):
        backend_resources(0, 0)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            backend_resources(1, 0.5)
