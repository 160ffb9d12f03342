"""bench/cluster.py's section of docs/benchmarks.md: rendered from its JSON, spliced in once."""

import json
import shutil
import tempfile
from pathlib import Path

from twisted.trial import unittest

from bench import cluster

RESULT = {
    "command": "python -m bench.cluster all", "machine": "2 cores", "seconds": 1,
    "stores": {"params": {"devices": 10, "messages": 1, "ingest_duration_s": 1},
               "fanout": {"sqlite": {"per_cpu_second": 100}, "redis": {"per_cpu_second": 60}, "ratio": 0.6},
               "ingest": {"sqlite": {"accepted_per_cpu_s": 100}, "redis": {"accepted_per_cpu_s": 90,
                          "redis_cpu_s": 1, "gateway_cpu_s": 2}, "ratio": 0.9}},
    "latency": {"error": "RuntimeError('h2send failed')"},
    "idle": {"devices": 20000, "connect_errors": 0, "nodes": 2, "window_s": 20.0,
             "redis_commands_per_second": {"evalsha": 0.67, "publish": 0.67}, "total_per_second": 1.34,
             "per_device_per_second": 0.000067},
}


class SectionTests(unittest.TestCase):
    def test_render_says_which_targets_are_met(self):
        text = cluster.render(RESULT)
        self.assertIn("| Redis fan-out / SQLite | 0.6 | **not met** |", text)
        self.assertIn("| Redis ingest / SQLite | 0.9 | met |", text)
        self.assertIn("_latency: RuntimeError('h2send failed')_", text)
        self.assertIn("20,000 connected idle devices", text)

    def test_splice_replaces_the_section_and_keeps_the_rest(self):
        docs = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, docs, True)
        (docs / "benchmarks.md").write_text("# Benchmarks\n\nhand-written prose\n")
        (docs / "benchmarks-cluster.json").write_text(json.dumps(RESULT))
        cluster.splice(docs)
        changed = dict(RESULT, stores=dict(RESULT["stores"], fanout=dict(RESULT["stores"]["fanout"], ratio=0.8)))
        (docs / "benchmarks-cluster.json").write_text(json.dumps(changed))
        cluster.splice(docs)
        text = (docs / "benchmarks.md").read_text()
        self.assertTrue(text.startswith("# Benchmarks\n\nhand-written prose\n"))
        self.assertEqual(text.count(cluster.SECTION_BEGIN), 1)
        self.assertEqual(text.count(cluster.SECTION_END), 1)
        self.assertIn("| Redis fan-out / SQLite | 0.8 | met |", text)
