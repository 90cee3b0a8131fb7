"""Open-loop load: requests arrive at a constant rate whether or not earlier ones were answered (issue 14,
item 5). Closed-loop wrk waits for each answer before sending the next, so an overloaded server only slows
its clients down; real users keep arriving, and the question is what the server makes of the excess:
goodput (2xx per second), how many it refuses (429) or fails (5xx), and the accepted requests' p50/p99.

The load comes from h2load (Debian package ``nghttp2-client``; C++, so it leaves the server most of the
CPU). wrk2 and vegeta, the usual open-loop tools, are not packaged here. In its ``--rate`` mode h2load opens
a fixed number of connections every rate period, each sending one request: every request is a new
connection, as from many distinct clients, and none waits for another's answer (kept-alive connections
would cap what is in flight at their number: closed loop again). So the server's cost of accepting a
connection is part of what is measured. Per-request statuses and times come from its ``--log-file``; a
request's time runs from its send on its connection, so a wait in the kernel's accept queue is not in it.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_PERIOD_MS = 1000  # h2load starts connections in bursts once a period: the shorter, the smoother


@dataclass(frozen=True)
class Rate:
    """An arrival rate: ``factor`` times the measured capacity, or ``per_s`` requests a second outright."""

    text: str
    factor: float | None = None
    per_s: float | None = None

    def resolve(self, capacity_req_s: float | None) -> float:
        if self.per_s is not None:
            return self.per_s
        if capacity_req_s is None:
            raise ValueError(f"open-loop rate {self.text!r} is relative, but no capacity was measured")
        return self.factor * capacity_req_s


def parse_rates(text: str) -> list[Rate]:
    """``"1x,2x,1500"`` -> rates: a number with ``x`` is a multiple of the measured capacity, one without is req/s."""
    rates = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(x?)", part)
        if not m or float(m.group(1)) <= 0:
            raise ValueError(f"unparsable open-loop rate {part!r}: want e.g. 2x (of capacity) or 1500 (req/s)")
        value = float(m.group(1))
        rates.append(Rate(part, factor=value) if m.group(2) else Rate(part, per_s=value))
    return rates


def plan(rate_per_s: float, seconds: float) -> tuple[int, int, int]:
    """(connections per period, period in whole ms as h2load takes it, total requests): the shortest period,
    so the smallest bursts, whose whole number of connections comes within 1% of the rate."""
    if rate_per_s < 1 or seconds <= 0:
        raise ValueError(f"want at least 1 req/s for a positive time, got {rate_per_s} req/s for {seconds} s")
    candidates = [(max(1, round(rate_per_s * ms / 1000)), ms) for ms in range(1, MAX_PERIOD_MS + 1)]
    per_period, period_ms = next(((n, ms) for n, ms in candidates if abs(n * 1000 / ms / rate_per_s - 1) <= 0.01),
                                 min(candidates, key=lambda c: abs(c[0] * 1000 / c[1] / rate_per_s - 1)))
    return per_period, period_ms, max(1, round(seconds * 1000 * per_period / period_ms))


def parse_log(text: str) -> np.ndarray:
    """h2load's ``--log-file``: one row a request, (start us since epoch, status or -1 for failed, duration us)."""
    rows = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or not all(re.fullmatch(r"-?\d+", f) for f in fields[:3]):
            raise ValueError(f"unparsable h2load log line {line!r}")
        rows.append([int(f) for f in fields[:3]])
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def summarise(rows: np.ndarray, sent: int, offered_req_s: float, elapsed_s: float) -> dict:
    """Goodput, refusals, failures and the accepted requests' latency from the per-request rows.

    ``sent`` requests were planned; those missing from the log (never connected) count as errors, as do
    failed streams. Goodput is 2xx over the whole run, arrivals and the drain after them.
    """
    status, ms = rows[:, 1], rows[:, 2] / 1000.0
    ok = (status >= 200) & (status < 300)
    accepted, refused = ms[ok], ms[status == 429]

    def pct(x: np.ndarray, q: float) -> float:
        return float(np.percentile(x, q)) if len(x) else float("nan")

    return {
        "offered_req_s": offered_req_s,
        "sent": sent,
        "goodput_req_s": int(ok.sum()) / elapsed_s if elapsed_s > 0 else float("nan"),
        "ok": int(ok.sum()),
        "status_429": int((status == 429).sum()),
        "status_5xx": int(((status >= 500) & (status < 600)).sum()),
        "other_status": int(((status > 0) & ~ok & (status != 429) & ((status < 500) | (status >= 600))).sum()),
        "errors": int((status < 0).sum()) + max(0, sent - len(rows)),
        "p50_ms": pct(accepted, 50),
        "p99_ms": pct(accepted, 99),
        # how quickly the excess learns it was refused: a 429 after seconds in a queue helps no client
        "refused_p50_ms": pct(refused, 50),
        "refused_p99_ms": pct(refused, 99),
        "elapsed_s": elapsed_s,
    }


# /proc/stat's first line, in order (proc(5)); guest time is counted in user already.
PROC_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
# What the split reports, as cores: inference and decoding run niced in our service (settings.compute_nice), so
# "nice" is their share, "user" the event loops' and the load generator's, "kernel" the TCP and syscalls.
CPU_SPLIT = {"user": ("user",), "nice": ("nice",), "kernel": ("system", "irq", "softirq"),
             "idle": ("idle", "iowait"), "steal": ("steal",)}


def proc_stat(text: str | None = None) -> dict[str, int] | None:
    """The whole machine's CPU time so far, in clock ticks per field; None where there is no /proc/stat."""
    if text is None:
        try:
            text = Path("/proc/stat").read_text()
        except OSError:
            return None
    fields = text.split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu" or len(fields) < 1 + len(PROC_STAT_FIELDS):
        raise ValueError(f"unparsable /proc/stat first line {text[:120]!r}")
    return dict(zip(PROC_STAT_FIELDS, (int(v) for v in fields[1:]), strict=False))


def cpu_split(before: dict[str, int] | None, after: dict[str, int] | None, cores: int) -> dict[str, float]:
    """Where the machine's cores went between two ``proc_stat`` readings: ``machine_<part>_cores`` for each part
    of ``CPU_SPLIT`` (they sum to ``cores``); empty without readings. Says whether a run was short of CPU, and
    how much of it the kernel's connection handling took."""
    if before is None or after is None:
        return {}
    spent = {k: after[k] - before[k] for k in PROC_STAT_FIELDS}
    total = sum(spent.values())
    if total <= 0:
        return {}
    return {f"machine_{part}_cores": cores * sum(spent[k] for k in fields) / total
            for part, fields in CPU_SPLIT.items()}


def elapsed_seconds(stdout: str) -> float:
    """The ``finished in 10.02s`` of h2load's summary, in seconds."""
    m = re.search(r"finished in ([\d.]+)(us|ms|s)\b", stdout)
    if not m:
        raise ValueError(f"no 'finished in' in h2load's output: {stdout[-500:]!r}")
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]


def run(url: str, body: Path, ctype: str, rate_per_s: float, seconds: float, log: Path,
        timeout_s: float = 30.0) -> dict:
    """``rate_per_s`` POSTs of ``body`` a second to ``url`` for ``seconds``, each on its own connection."""
    if shutil.which("h2load") is None:
        raise SystemExit("the open-loop mode needs h2load: apt-get install nghttp2-client")
    per_period, period_ms, n = plan(rate_per_s, seconds)
    cmd = ["h2load", "--h1", "-t", "1", "-n", str(n), "-c", str(n), "-r", str(per_period),
           "--rate-period", f"{period_ms}ms",
           "-N", f"{timeout_s:.0f}s", "-d", str(body), "-H", f"content-type: {ctype}", "--log-file", str(log), url]
    log.unlink(missing_ok=True)  # h2load appends to an existing log
    before, machine_before = resource.getrusage(resource.RUSAGE_CHILDREN), proc_stat()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 3 + timeout_s + 60)
    after, machine_after = resource.getrusage(resource.RUSAGE_CHILDREN), proc_stat()
    if proc.returncode != 0 or "finished in" not in proc.stdout:
        raise RuntimeError(f"h2load failed ({proc.returncode}): {proc.stdout[-800:]} {proc.stderr[-800:]}")
    elapsed = elapsed_seconds(proc.stdout)
    summary = summarise(parse_log(log.read_text()), n, per_period * 1000 / period_ms, elapsed)
    # the load generator's own CPU, in cores: what it took from the server it measures
    summary["client_cores"] = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / elapsed
    summary.update(cpu_split(machine_before, machine_after, os.cpu_count() or 1))
    return summary
