"""
Drive pypush (an unmodified third-party APNs courier client) against a pushd gateway:
connect, base token, filter, scoped token, receive and ack notifications sent through the
provider API. Run as a process by tests/test_interop_pypush.py; prints one line per step.

    python -m tests.interop.pypush_client COURIER_PORT PROVIDER_PORT GATEWAY_STATE WORKDIR
"""

import asyncio
import http.client
import json
import logging
import ssl
import sys
from pathlib import Path

from pypush.apns import filters, lifecycle, protocol, transport

from pushd.device.identity import enrol

TOPIC = "com.example.pypush"


def post(provider_port, state, token, payload):
    ctx = ssl.create_default_context(cafile=str(state / "ca.pem"))
    conn = http.client.HTTPSConnection("127.0.0.1", provider_port, context=ctx, timeout=10)
    key = (state / "provider.key").read_text().strip()
    conn.request("POST", f"/3/device/{token.hex()}", body=json.dumps(payload).encode(),
                 headers={"authorization": f"bearer {key}", "apns-topic": TOPIC})
    resp = conn.getresponse()
    resp.read()
    return resp.status


async def main(courier_port, provider_port, state, workdir):
    transport.COURIER_PORT = courier_port
    secret = (state / "enrol.secret").read_bytes().strip()
    ident = enrol(f"https://127.0.0.1:{provider_port}", secret, workdir, key_type="rsa")
    print("enrolled", ident.device_id, flush=True)
    async with lifecycle.create_apns_connection(ident.cert, ident.key, courier="127.0.0.1") as conn:
        base = await asyncio.wait_for(conn.base_token, 10)
        print("base token", base.hex(), flush=True)
        token = await asyncio.wait_for(conn.mint_scoped_token(TOPIC), 10)
        print("scoped token", token.hex(), flush=True)
        async with conn.notification_stream(TOPIC, token) as stream:
            for n in range(2):
                status = await asyncio.to_thread(post, provider_port, state, token, {"n": n})
                print("provider status", status, flush=True)
                msg = await asyncio.wait_for(stream.receive(), 10)
                await conn.ack(msg)
                print("received", msg.payload.decode(), "id", msg.id.hex(), flush=True)
        # A keepalive round trip, as pypush's own ping task does it (no backlog replay): the
        # gateway handles frames in order, so its answer proves it took the acks first.
        await conn._send(protocol.KeepAliveCommand())
        await asyncio.wait_for(conn._receive(filters.cmd(protocol.KeepAliveAck), backlog=False), 10)
        print("keepalive answered", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="pypush %(levelname)s %(message)s")
    c, p, state, work = sys.argv[1:5]
    asyncio.run(main(int(c), int(p), Path(state), Path(work)))
