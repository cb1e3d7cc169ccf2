"""The bench's table: units named, figures rounded, the TLS upstream beside the plaintext one."""

from __future__ import annotations

from typing import Any

from bench.report import report


def load(ttft_ms: float, streams_per_s: float) -> dict[str, float]:
    return {"streams": 100, "errors": 0, "streams_per_s": streams_per_s, "tokens_per_s": 64 * streams_per_s,
            "ttft_p50_ms": ttft_ms, "ttft_p99_ms": 2 * ttft_ms, "stall_fraction": 0.0}


def results() -> dict[str, Any]:
    paths = {"direct": (0.2012, 2500.4), "completions": (0.8049, 900.6), "tls": (0.9051, 810.2),
             "chat": (1.6123, 610.49)}
    throughput = {f"{scenario}_{path}": load(ttft * factor, rate)
                  for path, (ttft, rate) in paths.items()
                  for scenario, factor in (("c1", 1), ("c100", 10), ("saturation", 3))}
    return {
        "throughput": throughput,
        "capacity": [{"streams": 500, "opened": 500, "stalled": 0, "stall_fraction": 0.0, "rss_mib": 120.27,
                      "harness_gc_max_ms": 0.0},
                     {"streams": 1000, "opened": 1000, "stalled": 0, "stall_fraction": 0.0, "rss_mib": 150.21,
                      "harness_gc_max_ms": 1.234}],
        "capacity_cut_by_descriptors": False,
        "memory": {"boot_mib": 80.20703125, "opened_low": 200, "opened_high": 1000, "rss_at_200_mib": 90.13,
                   "rss_at_1000_mib": 110.34, "kib_per_idle_stream": 25.62},
        "abort": {"samples": 20, "p50_ms": 0.3456, "p99_ms": 0.9012},
        "quota": {"samples": 2000, "p50_ms": 0.1234, "p99_ms": 0.3012},
        "floors": {f"{name}_{pct}_ms": 0.05 for name in ("postgres_round_trip", "postgres_commit",
                                                            "redis_round_trip") for pct in ("p50", "p99")},
    }


def test_the_table_names_units_and_rounds_each_figure() -> None:
    lines = report(results()).splitlines()
    head = lines[0].split()
    assert head == ["direct", "completions", "completions", "TLS", "chat", "path"]
    assert lines[2].split()[-4:] == ["0.20", "0.80", "0.91", "1.61"]  # TTFT p50 at c=1, ms to 2 decimals
    streams = next(line for line in lines if line.strip().startswith("streams/s"))
    assert streams.split()[-4:] == ["2,500", "901", "810", "610"]  # whole streams/s
    memory = next(line for line in lines if line.startswith("memory"))
    assert memory.startswith("memory with idle open streams: boot 80.2 MiB, 200 streams 90.1 MiB, 1,000 streams")
    quota = next(line for line in lines if "quota check" in line)
    assert quota.split()[-3:] == ["0.12", "0.30", "2,000"]
    assert not any(char in line for line in lines for char in "{}[]")  # no Python dicts or lists


def test_the_table_gives_the_tls_upstream_against_the_plaintext_one() -> None:
    lines = report(results()).splitlines()
    assert "TLS upstream / plaintext: TTFT p50 at c=1 1.12x (+0.10 ms), saturation 0.90x" in lines
    added = next(line for line in lines if "added over direct" in line)
    assert added.split()[-4:] == ["-", "0.60", "0.70", "1.41"]


def test_the_capacity_rows_say_where_the_ladder_stopped() -> None:
    data = results()
    data["capacity"][1].update(stalled=5, stall_fraction=0.005)
    lines = report(data).splitlines()
    assert "capacity at 10 tokens/s, at most 0.1% of streams stalled: 500 streams" in lines
    assert [line.split() for line in lines if line.split()[0] == "1,000"] == [["1,000", "1,000", "5", "150.2", "1.23"]]


def with_resumable() -> dict[str, Any]:
    data = results()
    window = {"streams": 1000, "opened": 1000, "stalled": 0, "stall_fraction": 0.0, "rss_mib": 150.0,
              "harness_gc_max_ms": 0.0, "window_s": 5.0, "redis_connections": 12}
    rounds = [{"on": {"streams_per_s": on}, "off": {"streams_per_s": off}}
              for on, off in ((450, 500), (460, 510), (440, 490), (470, 480))]
    data["resumable"] = {
        "saturation": {"rounds": rounds, "on_streams_per_s": 451.6, "off_streams_per_s": 502.2, "ratio": 0.8993,
                       "on_cpu_ms_per_stream": 2.1, "off_cpu_ms_per_stream": 1.75},
        "round_trips_on": {**window, "round_trips_per_s": 98.62, "kib_per_s": 312.4, "worker_cpu_share": 0.52},
        "round_trips_off": {**window, "stalled": 2, "round_trips_per_s": 0.4, "kib_per_s": 0.04,
                            "worker_cpu_share": 0.4},
        "resume": {"samples": 199, "errors": 1, "live_turns": 20, "p50_ms": 1.234, "p99_ms": 3.456,
                   "health_p50_ms": 0.25, "health_p99_ms": 1.5},
    }
    return data


def test_the_resumable_rows_give_on_and_off_side_by_side() -> None:
    lines = report(with_resumable()).splitlines()
    assert next(line for line in lines if line.startswith("resumable streams")).split()[-4:] == ["off", "on", "/",
                                                                                                  "off"]
    rows = {line.split("  ")[1].strip(): line.split() for line in lines if line.startswith("  ") and "  " in line[2:]}
    saturation = next(cells for label, cells in rows.items() if label.startswith("chat path at saturation"))
    assert "median of 4 alternating rounds" in " ".join(saturation)
    assert saturation[-3:] == ["452", "502", "0.90"]
    trips = next(cells for label, cells in rows.items() if label.startswith("Redis round trips"))
    assert "1,000 paced streams" in " ".join(trips) and trips[-2:] == ["99", "0"]
    stalled = next(line for line in lines if "opened / stalled" in line)
    assert stalled.split()[-6:] == ["1,000", "/", "0", "1,000", "/", "2"]
    assert "    on / off in each round: 0.90, 0.90, 0.90, 0.98" in lines
    assert next(line for line in lines if "worker CPU a stream" in line).split()[-3:] == ["2.10", "1.75", "1.20"]
    assert next(line for line in lines if "worker CPU share" in line).split()[-3:] == ["0.52", "0.40", "1.30"]
    resume = next(line for line in lines if "resume on another instance" in line)
    assert resume.split()[-5:] == ["1.23", "3.46", "199", "(1", "failed)"]
    assert next(line for line in lines if "GET /health there" in line).split()[-2:] == ["0.25", "1.50"]


def test_a_run_from_before_resumable_streams_still_makes_a_table() -> None:
    lines = report(results()).splitlines()
    assert not any("resum" in line for line in lines)
