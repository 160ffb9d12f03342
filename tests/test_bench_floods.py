"""bench/floods.py sends what it says it sends: the hand-built frames parse as intended on
the real h2/hpack stack, and a small flood against a real gateway holds its connections."""

from __future__ import annotations

import unittest

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import RequestReceived
from h2.exceptions import DenialOfServiceError
from hpack import Decoder

from bench import floods


class HandBuiltFrames(unittest.TestCase):
    def server(self):
        conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        return conn

    def test_request_block_is_a_request_on_every_stream(self):
        conn = self.server()
        block = floods.request_block(floods.fake_token(1))
        data = floods.H2_PREFACE + floods.frame(floods.SETTINGS, 0, 0)
        data += floods.split_header_block(1, block, end_stream=True) + floods.split_header_block(3, block)
        events = [e for e in conn.receive_data(data) if isinstance(e, RequestReceived)]
        self.assertEqual([1, 3], [e.stream_id for e in events])
        headers = dict(events[1].headers)
        self.assertEqual(b"/3/device/" + floods.fake_token(1), headers[b":path"])
        self.assertNotIn(b"authorization", headers)

    def test_hpack_bomb_decodes_then_is_refused(self):
        block = floods.hpack_bomb_block(5000, floods.fake_token(2))
        decoder = Decoder()
        decoder.max_header_list_size = 1 << 20
        value = decoder.decode(block, raw=True)[-1][1]
        self.assertEqual(8000 + 16, len(value))  # five bits a character, plus the unique prefix
        self.assertNotEqual(block, floods.hpack_bomb_block(5000, floods.fake_token(2)))
        # What the gateway's h2 does with the full-size block: decode, then refuse.
        conn = self.server()
        big = floods.hpack_bomb_block(62 * 16384, floods.fake_token(2))
        frames = floods.split_header_block(1, big, end_stream=True)
        self.assertLessEqual(len(frames) // (16384 + 9), 63)
        with self.assertRaises(DenialOfServiceError):
            conn.receive_data(floods.H2_PREFACE + floods.frame(floods.SETTINGS, 0, 0) + frames)

    def test_sources(self):
        self.assertEqual({floods.ONE_ADDRESS}, {floods.source("one", i) for i in range(100)})
        many = [floods.source("many", i) for i in range(70000)]
        self.assertEqual(len(many), len(set(many)))
        self.assertFalse(any(a.startswith("127.0.") or a == floods.ONE_ADDRESS for a in many))


class AgainstARealGateway(unittest.TestCase):
    def test_trickle_is_closed_by_the_pre_connect_budget(self):
        """The flood runs against a real gateway, which closes what it trickles: its 32 KiB
        frame header is over the budget a connection has before Connect (--connect-budget)."""
        from bench import abuse, common

        work = common.tmpdir("pushd-floods-test-")
        gw = abuse.Gateway(work, 1024).start("test")
        try:
            spec = {"flood": "trickle", "mode": "many", "connections": 20, "duration": 2.0,
                    "courier_port": gw.courier_port, "provider_port": gw.provider_port}
            result = floods.run_in_process(spec)
        finally:
            gw.stop()
        self.assertNotIn("error", result)
        self.assertGreaterEqual(result["opened"], 20)  # it re-dials what the gateway closes
        self.assertGreater(result["closed_by_gateway"], 0)
