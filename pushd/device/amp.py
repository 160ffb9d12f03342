"""The AMP commands spoken on the device's local socket, between the daemon and apps."""

from twisted.protocols import amp


class NotRegistered(Exception):
    pass


class TopicOwned(Exception):
    """The topic belongs to another user (uid) of this machine: the daemon refuses to hand it over."""


class Register(amp.Command):
    """
    An app claims a topic (its application port name); answered with its token (hex). The
    first uid to register a topic owns it; the same uid registering again takes it over.
    """

    arguments = [(b"topic", amp.Unicode())]
    response = [(b"token", amp.Unicode())]
    errors = {ValueError: b"BAD_TOPIC", TopicOwned: b"TOPIC_OWNED"}


class Status(amp.Command):
    """The daemon's status report, as JSON."""

    arguments = []
    response = [(b"report", amp.Unicode())]


class Deliver(amp.Command):
    """Daemon to app: one notification. Answering it is the app's ack."""

    arguments = [
        (b"topic", amp.Unicode()),
        (b"payload", amp.String()),
        (b"message_id", amp.String()),
    ]
    response = []


class Reconnect(amp.Command):
    """The network changed: drop the courier connection and connect again now."""

    arguments = []
    response = []


class Unregister(amp.Command):
    """The app of this topic is uninstalled: its token answers providers 410 Unregistered."""

    arguments = [(b"topic", amp.Unicode())]
    response = [(b"known", amp.Boolean())]
    errors = {TopicOwned: b"TOPIC_OWNED"}
