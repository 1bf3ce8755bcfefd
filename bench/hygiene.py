"""Benchmark hygiene shared by the scripts in bench/: the machine, the load around every measurement, validity.

On a shared machine a timing measures whatever else runs. Every measurement in bench/ records the 1-minute load
average just before and just after it, and is **INVALID** when either exceeds the number of cores + 0.5: such a
figure is printed (marked) but never enters a median or a ratio. Implementations are alternated round by round
and reported as medians of the valid rounds; fewer than `MIN_ROUNDS` valid rounds is reported as no measurement.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics

MIN_ROUNDS = 3


def cores() -> int:
    "CPU cores this process may use."
    try: return len(os.sched_getaffinity(0))
    except AttributeError: return os.cpu_count() or 1


def load1() -> float:
    "The 1-minute load average."
    return os.getloadavg()[0]


def max_load() -> float:
    "The highest 1-minute load at which a timing still counts: cores + 0.5."
    return cores() + 0.5


def cpu_model() -> str:
    "The CPU model name from /proc/cpuinfo (or platform's guess elsewhere)."
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or 'unknown'


def machine() -> dict:
    "What a timing depends on: CPU, cores, torch, python, date and the load now."
    import torch
    return dict(cpu=cpu_model(), cores=cores(), torch=torch.__version__, python=platform.python_version(),
                date=datetime.datetime.now().isoformat(timespec='seconds'),
                loadavg=' '.join(f'{x:.2f}' for x in os.getloadavg()))


class LoadWindow:
    "Context manager that records the 1-minute load before and after a measurement: `.before`, `.after`, `.valid`."
    def __enter__(self):
        self.before = load1()
        return self

    def __exit__(self, *exc):
        self.after = load1()
        return False

    @property
    def valid(self) -> bool: return max(self.before, self.after) <= max_load()

    def record(self) -> dict:
        return dict(load_before=round(self.before, 2), load_after=round(self.after, 2), valid=self.valid)


def mark(result: dict) -> str:
    "'' for a valid measurement, else the INVALID marker with the loads."
    if result.get('valid', True): return ''
    return f"  INVALID (load {result['load_before']} -> {result['load_after']} > {max_load():.1f})"


def valid_median(results: list, key: str = 'samples_per_s') -> tuple[float | None, int]:
    "`(median of key over the valid results, how many were valid)`; None when fewer than MIN_ROUNDS are valid."
    vals = [r[key] for r in results if r.get('valid', True)]
    return (statistics.median(vals) if len(vals) >= MIN_ROUNDS else None), len(vals)
