"""A progress watchdog for one training process: the loop says where it is (`beat(step, where)`: setup, data read,
step, eval, collective), a thread watches the time since the last beat, and a run that makes no progress for
longer than its stall limit is handed to `on_stall` (which ends the process: a blocked read or a collective
waiting on a dead peer cannot be interrupted from Python; Ray then sees a lost worker and retries).

Why this is needed: Tune's stoppers run only after a trial reports, so a trial blocked in a read (a stuck network
filesystem, a named pipe) or in a collective (Ray Train leaves that to NCCL's own 30-minute timeout) is never
stopped, and the study waits for ever (ray-project/ray #47475, #23858).

The limit comes from the run itself: before the first steps (data preparation, the first read, compilation)
a generous allowance; then the larger of a floor and a multiple of the run's own median step time, so a slow
step (a long evaluation, a checkpoint, a machine shared with other trials) is not mistaken for a hang. A limit
given in the config (`stall_timeout`, seconds) replaces all of that."""
from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs

import storage

HUNG_EXIT_CODE = 75  # the process ended itself because its run hung (EX_TEMPFAIL: try again)
FIRST_STEPS_S = 600.0  # before MEDIAN_OF steps: set-up, the first read of the data, a torch.compile
FLOOR_S = 120.0  # never less: an evaluation pass or a checkpoint takes many steps' time
STEP_MULTIPLE = 50.0  # × the run's median step time
MEDIAN_OF = 3  # steps timed before the run's own pace sets the limit


@dataclass(frozen=True)
class Watch:
    """Where a run's progress goes beyond its own process: its stalls (`incidents`, a folder: record_stall) and its
    beats (`publish(beat)`, called from the watchdog's thread every poll; must not block)."""

    incidents: str | None = None
    publish: Callable[[dict], None] | None = None


@dataclass(frozen=True)
class Stall:
    """What the watchdog saw: no beat for idle_s (> limit_s) since the run was at `where` of `step`."""

    step: int
    where: str
    idle_s: float
    limit_s: float
    rank: int = 0

    def text(self, phase: str | None = None) -> str:
        what = f"{phase}, {self.where}" if phase else self.where
        rank = f", rank {self.rank}" if self.rank else ""
        return (f"hung: no step for {self.idle_s:.0f} s at step {self.step} ({what}{rank}; stall limit "
                f"{self.limit_s:.0f} s)")


def stall_limit(step_times: list[float], fixed: float | None) -> float:
    """Seconds without a beat after which the run counts as hung (see the module docstring)."""
    if fixed is not None:
        return fixed
    if len(step_times) < MEDIAN_OF:
        return FIRST_STEPS_S
    return max(FLOOR_S, STEP_MULTIPLE * statistics.median(step_times))


class Watchdog:
    """beat() from the training thread (cheap: two assignments); a daemon thread checks every poll_s and calls
    on_stall(Stall) once, from that thread, when the limit is passed. Use as a context manager."""

    def __init__(self, on_stall: Callable[[Stall], None], fixed_limit_s: float | None = None, rank: int = 0,
                 poll_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 publish: Callable[[dict], None] | None = None):
        self.on_stall, self.fixed, self.rank, self.clock, self.publish = on_stall, fixed_limit_s, rank, clock, publish
        self.poll_s = poll_s if poll_s is not None else min(5.0, (fixed_limit_s or FLOOR_S) / 10)
        self.state = (0, "setup", clock())  # (step, where, since): replaced whole, so a reader sees one beat
        self.step_times: deque[float] = deque(maxlen=101)
        self.last_step: tuple[int, float] | None = None
        self.fired: Stall | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, step: int, where: str) -> None:
        now = self.clock()
        if where == "step":  # the run's pace: time from one step's start to the next's, data read included
            if self.last_step is not None and step > self.last_step[0]:
                self.step_times.append((now - self.last_step[1]) / (step - self.last_step[0]))
            self.last_step = (step, now)
        self.state = (step, where, now)

    def limit(self) -> float:
        return stall_limit(list(self.step_times), self.fixed)

    def check(self) -> Stall | None:
        """The stall, if the run has passed its limit now (and on_stall has not been called yet)."""
        step, where, since = self.state
        idle, limit = self.clock() - since, self.limit()
        if self.fired is None and idle > limit:
            self.fired = Stall(step, where, idle, limit, self.rank)
            return self.fired
        return None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            stall = self.check()
            if stall is not None:
                self.on_stall(stall)
                return
            if self.publish is not None:
                step, where, since = self.state
                try:
                    self.publish({"step": step, "where": where, "idle_s": self.clock() - since,
                                  "limit_s": self.limit(), "time": time.time()})
                except Exception:  # the driver's waiting line loses this run's step; training goes on
                    self.publish = None

    def __enter__(self) -> Watchdog:
        self._thread = threading.Thread(target=self._watch, daemon=True, name="progress-watchdog")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 1)


def record_stall(incidents: str, stall: Stall) -> None:
    """Keep the stall under `incidents` (a folder per run: one JSON file per stall), where the study's driver
    reads it once the run's retries are spent (read_stalls)."""
    fs, path = storage.uri.resolve(incidents)
    now = time.time_ns()  # in the name to the nanosecond: two stalls within a millisecond keep their order
    record = {**asdict(stall), "text": stall.text(), "time": now / 1e9, "pid": os.getpid()}
    storage.uri.write_bytes_atomic(fs, f"{path}/{now:020d}-{uuid.uuid4().hex[:8]}.json", json.dumps(record).encode())


def read_stalls(incidents: str) -> list[dict]:
    """The stalls kept for a run, oldest first ([] when it never hung)."""
    fs, path = storage.uri.resolve(incidents)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return []
    kept = []
    for info in infos:
        if info.type == pafs.FileType.File and info.base_name.endswith(".json"):
            try:
                kept.append((info.base_name, json.loads(storage.uri.read_bytes(fs, info.path))))
            except (storage.StorageError, ValueError):
                continue  # one unreadable record does not hide the others
    # By when each was kept (the record's time: it also orders a folder whose older files carry the earlier
    # millisecond names); the name, which holds the nanosecond, breaks a tie.
    return [r for _, r in sorted(kept, key=lambda k: (k[1].get("time", 0.0), k[0]))]


def end_hung_process(stall: Stall, incidents: str | None, wait_s: float = 10.0) -> None:
    """on_stall for a training process: say so on stderr, keep the stall (given at most wait_s: the storage may
    be what hangs), then end this process: Ray sees a lost worker (or trial) and retries it. Nothing else can
    free a thread blocked in a read or a collective."""
    print(f"{stall.text()}: ending this process (Ray retries the run)", file=sys.stderr, flush=True)
    if incidents:
        t = threading.Thread(target=lambda: _quietly(record_stall, incidents, stall), daemon=True)
        t.start()
        t.join(wait_s)
    os._exit(HUNG_EXIT_CODE)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # the process ends either way; the retry still happens
        print(f"warning: the stall could not be recorded ({storage.uri.one_line(e)})", file=sys.stderr, flush=True)
