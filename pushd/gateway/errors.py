"""
Why the gateway refuses a push or a provider: domain errors, no HTTP here.

Each carries a ``reason`` in APNs' vocabulary ("BadDeviceToken", "Unregistered"...), which
is what a provider reads; the HTTP status that goes with it is the provider API's business
(pushd/gateway/provider/rules.py, ``status_of``), as enrolment's refusals (ENROL_STATUS).
"""

from __future__ import annotations


class Refusal(Exception):
    """A push (or a provider's request) refused; ``reason`` in APNs' words, ``extra`` more JSON fields."""

    #: The reason of the class, when the raiser gives none.
    reason = "InternalServerError"

    def __init__(self, reason: str | None = None, **extra):
        if reason is not None:
            self.reason = reason
        super().__init__(self.reason)
        self.extra = extra


class ShuttingDown(Refusal):
    """The gateway is stopping: the provider should go to another one."""

    reason = "Shutdown"


class StoreDown(Refusal):
    """The store did not answer: nothing was accepted, the provider may retry. (With
    --redis-wait, a push the master took but too few replicas confirmed answers this too; it
    may still be delivered, and a retry with the same apns-id replaces it: docs/cluster-redis.md.)"""

    reason = "ServiceUnavailable"


class BadToken(Refusal):
    """The device token does not resolve for this topic ("BadDeviceToken", "DeviceTokenNotForTopic")."""

    reason = "BadDeviceToken"


class Unregistered(Refusal):
    """The token is no longer valid (the app unregistered, or the device was revoked), since
    ``since`` (UNIX seconds)."""

    reason = "Unregistered"

    def __init__(self, since: float):
        super().__init__()
        self.since = since


class ProviderTokenRefused(Refusal):
    """The provider's authorization does not hold ("MissingProviderToken",
    "InvalidProviderToken", "ExpiredProviderToken")."""

    reason = "InvalidProviderToken"


class TooManyProviderTokenUpdates(Refusal):
    """A new provider token would be verified, but its source verified too many lately."""

    reason = "TooManyProviderTokenUpdates"
