"""
Send through aioapns 4.0, an unmodified third-party APNs provider library, with token
(JWT) auth, its host pointed at the gateway and an SSL context trusting the gateway's CA.
aioapns offers no ALPN and opens with the HTTP/2 preface. Prints one line per result.

    python -m tests.interop.aioapns_client PORT CA_PEM AUTH_KEY KEY_ID TEAM TOPIC TOKEN
"""

import asyncio
import json
import ssl
import sys

from aioapns import APNs, NotificationRequest
from aioapns.connection import APNsProductionClientProtocol


async def main(port, ca, auth_key, key_id, team, topic, token):
    APNsProductionClientProtocol.APNS_SERVER = "localhost"
    APNsProductionClientProtocol.APNS_PORT = port
    ctx = ssl.create_default_context(cafile=ca)
    with open(auth_key) as f:
        key = f.read()
    apns = APNs(key=key, key_id=key_id, team_id=team, topic=topic, ssl_context=ctx, max_connection_attempts=2)
    for body, to in (({"aps": {"alert": "from aioapns"}}, token), ({"aps": {"alert": "lost"}}, "00" * 32)):
        result = await asyncio.wait_for(
            apns.send_notification(NotificationRequest(device_token=to, message=body)), 20
        )
        print("result", json.dumps({"ok": result.is_successful, "status": result.status,
                                    "description": result.description, "id": result.notification_id}),
              flush=True)


if __name__ == "__main__":
    port, ca, auth_key, key_id, team, topic, token = sys.argv[1:8]
    asyncio.run(main(int(port), ca, auth_key, key_id, team, topic, token))
