"""
What an app uses to talk to the local device daemon: register a topic, get its token,
receive pushes (answering a Deliver is the ack).
"""

from __future__ import annotations

import json

from twisted.internet import defer, endpoints
from twisted.protocols import amp

from pushd.device import amp as cmds


class AppClient(amp.AMP):
    def __init__(self, on_push=None):
        super().__init__()
        self.on_push = on_push
        self.closed = defer.Deferred()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.closed.callback(None)

    @cmds.Deliver.responder
    def deliver(self, topic, payload, message_id):
        if self.on_push is not None:
            self.on_push(topic, payload, message_id)
        return {}

    def register(self, topic: str):
        """Fire with the topic's token (bytes) once the daemon has it; fail with
        TopicOwned if another user of this machine registered the topic."""
        d = self.callRemote(cmds.Register, topic=topic)
        return d.addCallback(lambda r: bytes.fromhex(r["token"]))

    def unregister(self, topic: str):
        """Fire with True if the topic was registered."""
        return self.callRemote(cmds.Unregister, topic=topic).addCallback(lambda r: r["known"])

    def reconnect(self):
        return self.callRemote(cmds.Reconnect)

    def status(self):
        return self.callRemote(cmds.Status).addCallback(lambda r: json.loads(r["report"]))


def connect(reactor, socket_path: str, on_push=None):
    """Fire with a connected AppClient."""
    ep = endpoints.UNIXClientEndpoint(reactor, socket_path)
    return endpoints.connectProtocol(ep, AppClient(on_push))
