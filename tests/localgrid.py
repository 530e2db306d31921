"""An in-process Flower Grid: real ClientApp / ServerApp code and real Messages, without Ray.

Every message is delivered by calling the ClientApp with the node's persistent ``Context``; a
client that raises becomes an error reply, exactly as the simulation engine reports it. Faults can
be injected per node (``"raise"``, ``"garbage"``, or ``"vanish@R"``: in round R the node trains and keeps its
state but its train reply is lost, or a function ``(request, honest reply) -> reply``: a hostile node),
and every reply is kept for inspection.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from lordba_fl.federation.strategy import frame_record


class LocalGrid(Grid):
    def __init__(self, client_app, num_nodes: int, run_config: dict, faults: dict[int, str] | None = None):
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.client_app = client_app
        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i, "num-partitions": num_nodes,
                                                               "allow-imports": "*", "allow-data": "/"},
                             state=RecordDict(), run_config=dict(run_config))
            for i in range(num_nodes)
        }
        self.faults = faults or {}
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    # the parts of Grid the strategy uses
    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def get_nodes(self):
        return []

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            fault = self.faults.get(node)
            try:
                if fault == "raise":
                    raise RuntimeError("client crashed")
                reply = self.client_app(msg, self.contexts[node])
                if callable(fault) and not reply.has_error():
                    reply = fault(msg, reply)  # a hostile node: (request, honest reply) -> what it sends instead
                if fault == "garbage" and msg.metadata.message_type == "train":
                    content = RecordDict({"adapter": frame_record(b"\x00garbage" * 50), "metrics": reply.content["metrics"]})
                    reply = Message(content, reply_to=msg)
                rnd = int(msg.content["config"]["server-round"])
                if fault == f"vanish@{rnd}" and msg.metadata.message_type == "train":
                    continue  # the link dropped after the client stored its state: the server never hears back
            except Exception as e:  # noqa: BLE001 - the engine turns any client exception into an error reply
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            self.replies.append(reply)
            replies.append(reply)
        return replies
