"""
docs/benchmarks.md from the raw results: the prose lives in bench/benchmarks.md.in, the
tables and plots are made here, so a run rewrites every figure and nothing by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

TEMPLATE = Path(__file__).with_name("benchmarks.md.in")


def _n(x, digits=0):
    if x is None:
        return "–"
    if isinstance(x, float) and digits:
        return f"{x:,.{digits}f}"
    return f"{round(x):,}"


def _ratio(a, b, digits=2):
    return f"{a / b:.{digits}f}" if a and b else "–"


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def memory_table(res):
    p, m = res["results"]["pushd"], res["results"]["mosquitto"]
    rows = []
    for a, b in zip(p, m):
        rows.append([_n(a["connections"]), f"{a['kib_per_connection']:.2f}", f"{b['kib_per_connection']:.2f}",
                     f"**{_ratio(a['kib_per_connection'], b['kib_per_connection'])}**",
                     f"{_n(a['rss_after_kib'] / 1024)} MiB ({a['processes']})",
                     f"{_n(b['rss_after_kib'] / 1024)} MiB ({b['processes']})",
                     _n(a["errors"] + b["errors"])])
    return _table(["connections", "pushd KiB/conn", "Mosquitto KiB/conn", "pushd / Mosquitto",
                   "pushd RSS (processes)", "Mosquitto RSS (processes)", "failed connects"], rows)


def connect_table(res):
    p, m = res["results"]["pushd"], res["results"]["mosquitto"]
    a, b = p[-1], m[-1]
    return _table(["server", "connections", "time to connect all", "handshakes + hello per second"], [
        ["pushd (TLS + Connect with ECDSA proof)", _n(a["connections"]), f"{a['connect_seconds']} s",
         _n(a["connects_per_second"])],
        ["Mosquitto (TLS + MQTT CONNECT)", _n(b["connections"]), f"{b['connect_seconds']} s",
         _n(b["connects_per_second"])],
    ])


def storm_table(res):
    p, m = res["results"]["pushd"], res["results"]["mosquitto"]

    def back(r):
        return f"{r['back_after_seconds']} s" if r["back_after_seconds"] is not None else \
            f"not all ({_n(r['reconnected'])})"

    rows = [
        ["pushd (SQLite store)", _n(p["devices"]), p["processes"], f"{p['restart_seconds']} s", back(p),
         f"{p['back_after_restart_began']} s" if p["back_after_restart_began"] else "–",
         f"{_n(p['queued_before'])} / {_n(p['delivered_after'])} / {_n(p['duplicates'])}"],
        ["Mosquitto", _n(m["devices"]), m["processes"], f"{m['restart_seconds']} s", back(m),
         f"{m['back_after_restart_began']} s" if m["back_after_restart_began"] else "–", "–"],
    ]
    table = _table(["server", "devices", "processes", "restart took", "all back after listening",
                    "all back after the stop", "queued / delivered / duplicates"], rows)
    return table + f"\n\npushd / Mosquitto (all back after listening) = **{_ratio(p['back_after_seconds'], m['back_after_seconds'])}**"


def fanout_table(res):
    r = res["results"]
    rows = []
    for key in ("pushd", "pushd_sqlite", "pushd_redis", "mosquitto_qos1", "mosquitto_qos0"):
        x = r.get(key)
        if not x:
            continue
        rows.append([x["server"], _n(x["devices"]), f"{_n(x['delivered'])} / {_n(x['expected'])}",
                     f"{x['seconds']} s", _n(x["per_second"]), _n(x["per_cpu_second"]),
                     f"{x['load_cpu_share']:.2f}"])
    table = _table(["server", "devices", "delivered / expected", "time", "deliveries/s",
                    "per server CPU-second", "load generator CPU (cores)"], rows)
    p, q1, q0 = r["pushd"], r["mosquitto_qos1"], r["mosquitto_qos0"]
    return table + (
        f"\n\npushd / Mosquitto QoS 1 = **{_ratio(p['per_second'], q1['per_second'])}** (deliveries/s), "
        f"**{_ratio(p['per_cpu_second'], q1['per_cpu_second'])}** (per CPU-second); "
        f"pushd / Mosquitto QoS 0 = **{_ratio(p['per_second'], q0['per_second'])}** (deliveries/s), "
        f"**{_ratio(p['per_cpu_second'], q0['per_cpu_second'])}** (per CPU-second)."
    )


def ingest_table(res):
    rows = []
    for x in res["results"]:
        rows.append([{"h2": "HTTP/2", "h1": "HTTP/1.1"}[x["protocol"]],
                     "JWT (ES256)" if x["auth"] == "jwt" else "static key", x["store"],
                     f"{x['clients']} × {x['streams']}", _n(x.get("accepted")), _n(x.get("accepted_per_s")),
                     _n(x.get("accepted_per_cpu_s")), _n(x.get("non_200", 0)),
                     f"{_n(x.get('stored_after'))} ({x.get('durable_check')})"])
    return _table(["protocol", "auth", "store", "connections × streams", "accepted (200)", "accepted/s",
                   "per gateway CPU-second", "not 200", "rows in the store after"], rows)


def latency_table(res):
    rows = []
    for store, r in res["results"].items():
        for x in r["rows"]:
            if "max" not in r:  # Mosquitto: the same absolute rates as pushd with SQLite
                rows.append(["Mosquitto QoS 1 (in memory)", f"{_n(x['offered_per_second'])}/s",
                             _n(x["achieved_per_second"]), f"{_n(x['delivered'])} / {_n(x['accepted'])}",
                             x["p50_ms"], x["p99_ms"], x["p999_ms"], x["max_ms"]])
                continue
            rows.append([f"pushd, {store}", f"{int(x['fraction'] * 100)}% of {_n(r['max']['per_second'])}/s",
                         _n(x["achieved_per_second"]), f"{_n(x['delivered'])} / {_n(x['accepted'])}",
                         x["p50_ms"], x["p99_ms"], x["p999_ms"], x["max_ms"]])
    table = _table(["server, store", "offered", "sent/s", "delivered / accepted", "p50 ms", "p99 ms", "p99.9 ms",
                    "max ms"], rows)
    r = res["results"]
    if "mosquitto" in r and "sqlite" in r:
        ratios = [f"{a['p99_ms'] / b['p99_ms']:.0f}× at {_n(a['offered_per_second'])}/s"
                  for a, b in zip(r["sqlite"]["rows"], r["mosquitto"]["rows"]) if b["p99_ms"]]
        table += "\n\np99 pushd (SQLite) / Mosquitto QoS 1: " + ", ".join(ratios) + "."
    return table


def targets_table(results):
    """The issue's targets against this run's figures."""
    rows = []

    def row(target, measured, met):
        rows.append([target, measured, "met" if met else ("**missed**" if met is not None else "not measured")])

    mem = results.get("memory", {}).get("results")
    if mem:
        a, b = mem["pushd"][-1], mem["mosquitto"][-1]
        r = a["kib_per_connection"] / b["kib_per_connection"]
        row("memory per idle TLS connection ≤ 1.0× Mosquitto",
            f"{r:.2f}× at {_n(a['connections'])} ({a['kib_per_connection']:.1f} vs {b['kib_per_connection']:.1f} KiB)",
            r <= 1.0)
        row("moonshot: ≤ 10 KiB per connection", f"{a['kib_per_connection']:.1f} KiB", a["kib_per_connection"] <= 10)
        top = max(x["connections"] for x in mem["pushd"])
        row("200k connected TLS devices on one host", f"{_n(top)} held (largest count run)",
            top >= 200_000 if top >= 200_000 else None)
    fan = results.get("fanout", {}).get("results")
    if fan:
        p, q1, q0 = fan["pushd"], fan["mosquitto_qos1"], fan["mosquitto_qos0"]
        r1, r0 = p["per_cpu_second"] / q1["per_cpu_second"], p["per_cpu_second"] / q0["per_cpu_second"]
        row("fan-out with acks ≥ 1.0× Mosquitto QoS 1 per core", f"{r1:.2f}× (per server CPU-second)", r1 >= 1.0)
        row("fan-out with acks ≥ 0.7× Mosquitto QoS 0 per core", f"{r0:.2f}× (per server CPU-second)", r0 >= 0.7)
    ing = results.get("ingest", {}).get("results")
    if ing:
        x = next(x for x in ing if x["protocol"] == "h2" and x["auth"] == "jwt" and x["store"].startswith("sqlite"))
        row("≥ 10,000 accepted/s per core over HTTP/2, durable",
            f"{_n(x['accepted_per_cpu_s'])} per gateway CPU-second ({_n(x['accepted_per_s'])}/s), JWT, SQLite fsync",
            x["accepted_per_cpu_s"] >= 10_000)
    lat = results.get("latency", {}).get("results")
    if lat:
        for store, r in lat.items():
            half = next((x for x in r["rows"] if x.get("fraction") == 0.5), None)
            if half:
                row(f"p99 provider→app ≤ 10 ms at 50% of max rate ({store})",
                    f"{half['p99_ms']} ms at {_n(half['offered_per_second'])}/s", half["p99_ms"] <= 10)
    storm = results.get("storm", {}).get("results")
    if storm:
        p = storm["pushd"]
        back = p["back_after_seconds"]
        row(f"reconnect storm of {_n(p['devices'])} devices back in ≤ 30 s",
            f"{back} s after the gateways listened again ({p['back_after_restart_began']} s after the stop)"
            if back is not None else "not all came back", back is not None and back <= 30)
    return _table(["target", "this run", ""], rows)


def machine_line(results):
    m = results.get("machine", {})
    return (f"{m.get('cpus')} cores ({m.get('cpu_model')}), {m.get('memory_gib')} GiB, fd limit "
            f"{_n(m.get('fd_limit'))}; Python {m.get('python')}, Twisted {m.get('twisted')}, {m.get('openssl')}; "
            f"{m.get('mosquitto')}; {m.get('redis')}; {m.get('h2load')}; Linux {m.get('kernel')}. "
            f"Run on {results.get('date')} ({results.get('mode')} mode), all scenarios in "
            f"{_n(results.get('total_seconds'))} s.")


def plots(results, docs: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = {}
    if "memory" in results:
        r = results["memory"]["results"]
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for kind, label in (("pushd", "pushd gateway"), ("mosquitto", "Mosquitto")):
            xs = [0] + [x["connections"] for x in r[kind]]
            ys = [0] + [(x["rss_after_kib"] - x["rss_before_kib"]) / 1024 for x in r[kind]]
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel("idle TLS connections")
        ax.set_ylabel("RSS growth (MiB, all processes)")
        ax.set_title("Memory vs connections")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(docs / "benchmarks-memory.png", dpi=100)
        plt.close(fig)
        made["memory"] = "benchmarks-memory.png"
    if "latency" in results:
        r = results["latency"]["results"]
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for store, style, name in (("sqlite", "-", "pushd sqlite"), ("redis", "--", "pushd redis"),
                                   ("mosquitto", ":", "Mosquitto QoS 1")):
            if store not in r:
                continue
            xs = [x["achieved_per_second"] for x in r[store]["rows"]]
            for key, marker in (("p50_ms", "o"), ("p99_ms", "s"), ("p999_ms", "^")):
                ax.plot(xs, [x[key] for x in r[store]["rows"]], style, marker=marker,
                        label=f"{name} {key[:-3].replace('p999', 'p99.9')}")
        ax.set_yscale("log")
        ax.set_xlabel("offered notifications/s (provider → app)")
        ax.set_ylabel("latency (ms, log)")
        ax.set_title("End-to-end latency percentiles vs offered rate")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(docs / "benchmarks-latency.png", dpi=100)
        plt.close(fig)
        made["latency"] = "benchmarks-latency.png"
    return made


def write(results, docs: Path):
    plots(results, docs)
    fields = {"machine": machine_line(results)}
    try:
        fields["targets_table"] = targets_table(results)
    except (KeyError, TypeError, IndexError, StopIteration, ZeroDivisionError) as e:
        fields["targets_table"] = f"_results incomplete: {e!r}_"
    for name, fn in (("memory_table", memory_table), ("connect_table", connect_table),
                     ("storm_table", storm_table), ("fanout_table", fanout_table),
                     ("ingest_table", ingest_table), ("latency_table", latency_table)):
        scenario = name.split("_")[0]
        if scenario == "connect":
            scenario = "memory"
        try:
            fields[name] = fn(results[scenario]) if scenario in results else "_not run yet_"
        except (KeyError, TypeError, IndexError) as e:
            fields[name] = f"_results incomplete: {e!r}_"
        if scenario in results:
            fields[f"{scenario}_params"] = ", ".join(f"{k} {v}" for k, v in results[scenario]["params"].items())
            fields[f"{scenario}_seconds"] = str(results[scenario].get("seconds", "–"))
    from bench import cluster  # its own run (python -m bench.cluster all) writes what this shows

    fields["cluster_section"] = cluster.section(docs) or "_cluster: not run yet (python -m bench.cluster all)_\n"
    text = TEMPLATE.read_text()
    text = re.sub(r"\{\{(\w+)\}\}", lambda m: fields.get(m.group(1), "–"), text)
    (docs / "benchmarks.md").write_text(text)
