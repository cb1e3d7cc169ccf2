"""``gateway bench``'s results as one table for a person: each figure with its unit and rounded to what it can
tell (ms to 2 decimals, streams/s and tokens/s to whole numbers, MiB to 1 decimal). The JSON file keeps them
raw."""

from __future__ import annotations

import re
from typing import Any

# The throughput scenarios' paths, as the results name them and as the table heads them.
PATHS = {"direct": "direct", "completions": "completions", "tls": "completions TLS", "chat": "chat path",
         "agent": "agent turn"}
STALL_LIMIT = 0.001  # a capacity level holds when at most this share of its streams stalled

Row = str | list[str]  # a section's title, or a row of cells


def ms(value: float) -> str:
    return f"{value:.2f}"


def whole(value: float) -> str:
    return f"{value:,.0f}"


def mib(value: float) -> str:
    return f"{value:.1f}"


def render(rows: list[Row], labelled: bool = True) -> list[str]:
    """Rows of cells in aligned columns, right-aligned but for the first when it holds labels; titles as
    they are."""
    cells = [row for row in rows if isinstance(row, list)]
    widths = [max(len(row[n]) for row in cells if n < len(row)) for n in range(max(map(len, cells)))]
    lines = []
    for row in rows:
        if isinstance(row, str):
            lines.append(row)
            continue
        first = row[0].ljust(widths[0]) if labelled else row[0].rjust(widths[0])
        lines.append((first + "".join(f"  {cell:>{widths[n + 1]}}" for n, cell in enumerate(row[1:]))).rstrip())
    return lines


def throughput_rows(t: dict[str, Any]) -> list[Row]:
    paths = [p for p in PATHS if f"c1_{p}" in t]
    direct = t["c1_direct"]["ttft_p50_ms"]
    saturation = t["saturation_direct"]["streams_per_s"]

    def row(name: str, scenario: str, key: str, fmt: Any) -> list[str]:
        return [f"  {name}", *(fmt(t[f"{scenario}_{p}"][key]) for p in paths)]

    return [
        ["", *(PATHS[p] for p in paths)],
        "time to first token",
        row("p50 at concurrency 1 (ms)", "c1", "ttft_p50_ms", ms),
        row("p99 at concurrency 1 (ms)", "c1", "ttft_p99_ms", ms),
        row("p50 at concurrency 100 (ms)", "c100", "ttft_p50_ms", ms),
        row("p99 at concurrency 100 (ms)", "c100", "ttft_p99_ms", ms),
        ["  added over direct, p50 at c=1 (ms)",
         *("-" if p == "direct" else ms(t[f"c1_{p}"]["ttft_p50_ms"] - direct) for p in paths)],
        "saturation: concurrency 64, 64 unpaced deltas a stream",
        row("streams/s", "saturation", "streams_per_s", whole),
        row("tokens/s", "saturation", "tokens_per_s", whole),
        ["  share of direct", *(f"{t[f'saturation_{p}']['streams_per_s'] / saturation:.2f}" for p in paths)],
    ]


def tls_line(t: dict[str, Any]) -> str:
    """The TLS upstream against the plaintext one, both through /v1/chat/completions."""
    if "c1_tls" not in t:
        return "completions over TLS: not measured"
    plain, tls = t["c1_completions"]["ttft_p50_ms"], t["c1_tls"]["ttft_p50_ms"]
    ratio = t["saturation_tls"]["streams_per_s"] / t["saturation_completions"]["streams_per_s"]
    return (f"TLS upstream / plaintext: TTFT p50 at c=1 {tls / plain:.2f}x ({tls - plain:+.2f} ms), "
            f"saturation {ratio:.2f}x")


def capacity_lines(results: dict[str, Any]) -> list[str]:
    steps = results["capacity"]
    held = [s for s in steps if s["stall_fraction"] <= STALL_LIMIT and s["opened"] == s["streams"]]
    best = max((s["streams"] for s in held), default=0)
    topped = bool(steps) and steps[-1] in held
    lines = [f"capacity at 10 tokens/s, at most 0.1% of streams stalled: {best:,} streams"
             + (" (the ladder's top: no level stalled)" if topped else "")]
    rows: list[Row] = [["streams", "opened", "stalled", "RSS (MiB)", "harness GC max (ms)"]]
    rows += [[f"{s['streams']:,}", f"{s['opened']:,}", f"{s['stalled']:,}", mib(s["rss_mib"]),
              ms(s["harness_gc_max_ms"])] for s in steps]
    lines += [f"  {line}" for line in render(rows, labelled=False)]
    if (topped or not steps) and results.get("capacity_cut_by_descriptors"):
        lines.append("  the descriptor limit cut the ladder short: raise `ulimit -n` to let it climb further")
    return lines


def memory_line(memory: dict[str, Any]) -> str:
    at = sorted((int(m.group(1)), value) for key, value in memory.items()
                if (m := re.fullmatch(r"rss_at_(\d+)_mib", key)))
    levels = ", ".join(f"{count:,} streams {mib(value)} MiB" for count, value in at)
    return (f"memory with idle open streams: boot {mib(memory['boot_mib'])} MiB, {levels}; "
            f"{memory['kib_per_idle_stream']:.1f} KiB a stream")


def resumable_rows(r: dict[str, Any]) -> list[Row]:
    """Resumable streams on (each chat turn's events kept in Redis) and off, on gateways measured side by
    side."""
    saturation, on, off = r["saturation"], r["round_trips_on"], r["round_trips_off"]
    rounds = saturation["rounds"]
    on_cpu, off_cpu = saturation["on_cpu_ms_per_stream"], saturation["off_cpu_ms_per_stream"]
    return [
        ["resumable streams", "on", "off", "on / off"],
        [f"  chat path at saturation, median of {len(rounds)} alternating rounds (streams/s)",
         whole(saturation["on_streams_per_s"]), whole(saturation["off_streams_per_s"]), f"{saturation['ratio']:.2f}"],
        "    on / off in each round: " + ", ".join(
            f"{p['on']['streams_per_s'] / p['off']['streams_per_s']:.2f}" for p in rounds),
        ["    worker CPU a stream (ms)", ms(on_cpu), ms(off_cpu), f"{on_cpu / off_cpu:.2f}"],
        [f"  Redis round trips of the worker a second, {on['streams']:,} paced streams",
         whole(on["round_trips_per_s"]), whole(off["round_trips_per_s"])],
        ["    KiB a second to Redis", whole(on["kib_per_s"]), whole(off["kib_per_s"])],
        ["    worker CPU share in the window", f"{on['worker_cpu_share']:.2f}", f"{off['worker_cpu_share']:.2f}",
         f"{on['worker_cpu_share'] / off['worker_cpu_share']:.2f}"],
        ["    streams opened / stalled in the window", f"{on['opened']:,} / {on['stalled']:,}",
         f"{off['opened']:,} / {off['stalled']:,}"],
    ]


def latency_rows(results: dict[str, Any]) -> list[Row]:
    """The abort, the quota check, a resume on another instance, and the stores' own floors measured from
    the harness."""
    rows: list[Row] = [["latency (ms)", "p50", "p99", "samples"]]
    for key, label in (("abort", "abort to upstream close"), ("quota", "quota check")):
        figures = results[key]
        rows.append([f"  {label}", ms(figures["p50_ms"]), ms(figures["p99_ms"]), f"{figures['samples']:,}"])
    if "resumable" in results:
        resume = results["resumable"]["resume"]
        failed = f" ({resume['errors']:,} failed)" if resume["errors"] else ""
        rows.append(["  resume on another instance, to the first replayed byte", ms(resume["p50_ms"]),
                     ms(resume["p99_ms"]), f"{resume['samples']:,}{failed}"])
        rows.append(["    GET /health there, timed alike (its floor)", ms(resume["health_p50_ms"]),
                     ms(resume["health_p99_ms"])])
    floors = results["floors"]
    for key, label in (("postgres_round_trip", "PostgreSQL round trip"), ("postgres_commit", "one-row commit"),
                       ("redis_round_trip", "Redis round trip")):
        rows.append([f"  {label}", ms(floors[f"{key}_p50_ms"]), ms(floors[f"{key}_p99_ms"])])
    return rows


def report(results: dict[str, Any]) -> str:
    t = results["throughput"]
    lines = render(throughput_rows(t))
    lines.append(tls_line(t))
    lines += capacity_lines(results)
    lines.append(memory_line(results["memory"]))
    if "resumable" in results:
        lines += render(resumable_rows(results["resumable"]))
    lines += render(latency_rows(results))
    return "\n".join(lines)
