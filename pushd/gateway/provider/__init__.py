"""
The provider API (``POST /3/device/<hex token>`` as APNs defines it, and device enrolment):
``rules`` decides, transport-neutral; ``http1`` (twisted.web) and ``http2`` (h2) carry it,
both answering with ``rules.Answer``; ``limits`` holds the settings that bound them.
"""

from pushd.gateway.provider.http1 import ProviderSite, make_site
from pushd.gateway.provider.limits import Limits
from pushd.gateway.provider.rules import Answer, DeviceAPI, ProviderAPI, new_apns_id

__all__ = ["Answer", "DeviceAPI", "Limits", "ProviderAPI", "ProviderSite", "make_site", "new_apns_id"]
