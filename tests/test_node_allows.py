"""A SuperNode imports code or reads files named in the run config only where its node config (or
environment) allows them; registered names need no permission."""

import pytest
from flwr.app import Context, Message, RecordDict

from lordba_fl.federation.apps import check_node_allows, client_query


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("LORDBA_FL_ALLOW_IMPORTS", raising=False)
    monkeypatch.delenv("LORDBA_FL_ALLOW_DATA", raising=False)


def test_registered_names_need_no_permission():
    check_node_allows({"task": "skills", "method": "fed-sb", "server.aggregator": "refit"}, {})


@pytest.mark.parametrize("key", ["task", "method", "server.aggregator"])
def test_an_import_path_needs_its_package_allowed(key, monkeypatch):
    with pytest.raises(PermissionError, match="allow-imports='os'"):
        check_node_allows({key: "os:getpid"}, {"partition-id": 0})
    with pytest.raises(PermissionError):
        check_node_allows({key: "os.path:join"}, {"allow-imports": "mypkg"})
    check_node_allows({key: "os.path:join"}, {"allow-imports": "mypkg, os"})
    check_node_allows({key: "os:getpid"}, {"allow-imports": "*"})
    monkeypatch.setenv("LORDBA_FL_ALLOW_IMPORTS", "os")
    check_node_allows({key: "os:getpid"}, {})
    with pytest.raises(PermissionError):  # the node's own config wins over the environment
        check_node_allows({key: "os:getpid"}, {"allow-imports": "mypkg"})


def test_a_data_path_must_lie_in_an_allowed_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(PermissionError, match="allow-data"):
        check_node_allows({"data.files.path": str(data / "a.jsonl")}, {})
    check_node_allows({"data.files.path": str(data / "a.jsonl")}, {"allow-data": str(data)})
    with pytest.raises(PermissionError):  # no escape through ..
        check_node_allows({"data.files.path": str(data / ".." / "secret.jsonl")}, {"allow-data": str(data)})
    check_node_allows({"data.files.path": ""}, {})  # no file named: nothing to allow


def test_a_client_refuses_before_importing_anything():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as LocalGrid sets them
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config={"task": "no_such_package_xyz:load"})
    msg = Message(content=RecordDict(), dst_node_id=7, message_type="query")
    # a PermissionError, not the registry's "cannot import" error: nothing was imported
    with pytest.raises(PermissionError, match="no_such_package_xyz"):
        client_query(msg, ctx)
