"""The scoreboard: pool-wide state in shared memory, so status costs requests nothing.

Created by the master before it forks (an anonymous ``MAP_SHARED`` mapping, or a memfd
that survives the master re-executing itself on reload). Layout::

    header  (HEADER_SIZE bytes)  written by the master only: its pid, generation, totals,
                                 listen queue; read by workers for the status page;
                                 its last 8 bytes are flags (draining: the ping path
                                 answers 503 once a stop is asked for)
    slot[i] (SLOT_SIZE bytes)    one per worker id; written by that worker on every state
                                 change, by the master when it assigns or frees the slot

A worker writes its own slot twice per request (busy with method and URI, then idle with
the request count): two ``struct.pack_into`` calls, no syscall, no lock. Readers may see a
half-written slot for one sample; every field is independent, so the worst case is one
stale value, never a crash (text is decoded with ``errors="replace"``). The exception is
"busy" read together with the idle record's start time (0): :meth:`Scoreboard.read_slot`
reads that slot again.

Threaded workers (``workers.threads`` > 1) run several requests at once, and one request
record per slot cannot hold them without a lock between the threads. They get a range of
**thread entries** instead, after the slots and their histograms::

    entry[k] (ENTRY_SIZE bytes)  one per app thread: the same request record as a slot's,
                                 plus the thread's shed count; written only by its thread

The master reserves a worker's range before forking it (first fit; the file grows when no
range is free, so ``threads = 1`` pools never have the region at all) and records it in
the slot (``THREADS``: first entry, count). Each thread writes only its own entry, the
worker's main thread only the slot's state byte: still one writer per field, no lock.
:meth:`Scoreboard.read_slot` folds the entries into the slot's view (busy when any thread
is, ``busy_since`` of the oldest request, the sum of the requests) and lists every request
in flight.

Between the slots and the thread entries: one request-duration histogram per slot, then
one more for the workers that are gone ("retired", at index ``slots``)::

    hist[i]  (HIST.size bytes)  count per bucket of DURATION_BUCKETS (+Inf last), sum (s)

Each worker owns its histogram (one writer: plain stores, no lock, no syscall; the threads
of a threaded worker share it under one lock); readers sum them all. When the master
frees a slot (:meth:`Scoreboard.clear`) it first adds that histogram into the retired
one, so the pool's counts only grow, as Prometheus counters must.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

from .wire.states import STATE_CODES, STATE_NAMES, WorkerState

MAX_SLOTS = 1024
HEADER = struct.Struct(
    "=i I d"  # master pid, generation, started_at (wall clock)
    " Q Q Q Q Q Q Q Q Q Q"  # accepted_dead, respawns, crashes, timeouts, slow, recycled,
    # shed_dead, max_children_reached, max_active, spawn_failures
    " q q"  # queue, max_queue (-1 = unknown)
    " I I"  # target worker count, backoff (ms) now
    " Q Q Q"  # accept back-offs, log lines lost (workers gone), idle workers found stuck
    " Q i"  # lines the master could not write to its log, the errno failing now (0: none)
)
HEADER_SIZE = 256
# Pool-wide flags, at the end of the header area so the header's layout can grow up to
# them. Workers read them where they need them (the ping path), at no cost elsewhere.
FLAGS = struct.Struct("=I")
FLAGS_OFF = HEADER_SIZE - 8
FLAG_DRAINING = 1  # a stop was asked for: the ping path answers 503 "draining"
HEADER_FIELDS = (
    "master_pid", "generation", "started_at",
    "accepted_dead", "respawns", "crashes", "timeouts", "slow", "recycled", "shed_dead",
    "max_children_reached", "max_active", "spawn_failures",
    "queue", "max_queue", "target", "backoff_ms",
    "accept_backoffs_dead", "log_lines_lost_dead", "stuck",
    "master_log_lost", "master_log_errno",
)

# Per slot: identity (written at spawn), request state (written per request), samples
# (written by the master's tick), counters.
IDENT = struct.Struct("=i I d")  # pid, generation, started_at
IDENT_OFF = 0
REQ = struct.Struct("=B 7x Q d 16s 200s")  # state, requests, busy_since (monotonic), method, uri
REQ_OFF = 16
IDLE = struct.Struct("=B 7x Q d")  # state, requests, busy_since=0
SAMPLE = struct.Struct("=Q f f")  # rss bytes, cpu percent, spare
SAMPLE_OFF = REQ_OFF + REQ.size
COUNTERS = struct.Struct("=Q I I")  # shed, slow-dumped request number, stop requested
COUNTERS_OFF = SAMPLE_OFF + SAMPLE.size
THREADS = struct.Struct("=I I")  # first thread entry, number of entries (0 = one thread)
THREADS_OFF = COUNTERS_OFF + COUNTERS.size
# heartbeat (monotonic; the worker's loop writes it when it wakes up idle), worker id (the
# replacement keeps the id of the worker it replaces, not the slot's number), accept
# back-offs at the open-files limit, log lines lost (the master was not reading)
EXTRA = struct.Struct("=d I I I")
EXTRA_OFF = THREADS_OFF + THREADS.size
SLOT_SIZE = 320
assert EXTRA_OFF + EXTRA.size <= SLOT_SIZE
ENTRY = struct.Struct("=B 7x Q d 16s 200s Q")  # the REQ record, then shed
ENTRY_SHED_OFF = REQ.size
ENTRY_SIZE = 256
assert ENTRY.size <= ENTRY_SIZE
MIN_ENTRIES = 64  # the thread region grows by at least this many entries
assert HEADER.size <= FLAGS_OFF

# Request durations, in seconds: Prometheus' default buckets (the upper bounds of "le").
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
N_BUCKETS = len(DURATION_BUCKETS) + 1  # the last one counts everything above 10 s
HIST = struct.Struct(f"={N_BUCKETS}Q d")  # per-bucket counts (not cumulative), sum
HIST_SUM_OFF = N_BUCKETS * 8
_COUNT = struct.Struct("=Q")
_BEAT = struct.Struct("=d")
_U32 = struct.Struct("=I")
_SUM = struct.Struct("=d")
# One byte of the header the master bumps to ask workers to reopen their log files.
LOG_EPOCH_OFF = HEADER_SIZE - 1
assert FLAGS_OFF + FLAGS.size <= LOG_EPOCH_OFF

STOP_FLAG_STOPPING = 1  # the slot's "stop requested" value: asked to stop, or leaving
STOP_FLAG_STUCK = 2  # missed its heartbeat: being replaced

_BUSY = STATE_CODES[WorkerState.BUSY]
_IDLE = STATE_CODES[WorkerState.IDLE]


@dataclass(frozen=True)
class SlotRecord:
    """One worker's slot as a reader sees it (:meth:`Scoreboard.read_slot`): a threaded
    worker's thread entries are folded in (busy when any thread is, ``busy_since`` of the
    oldest request, the sum of the requests)."""

    slot: int
    pid: int  # 0: a free slot
    generation: int
    started_at: float  # wall clock
    state: WorkerState
    requests: int
    busy_since: float  # monotonic, of the oldest request running; 0.0 when idle
    method: str  # of that request
    uri: str
    rss: int  # bytes, as the master last sampled them
    cpu: float  # percent, as the master last sampled it
    shed: int  # connections answered 503 without running the app
    slow_dumped: int  # the request number whose stack was dumped for being slow
    threads: int  # app threads (1 without workers.threads)
    in_flight: List[Tuple[float, str, str]]  # (busy_since, method, uri), oldest first
    stopping: bool  # the master asked it to stop
    stuck: bool  # missed its heartbeat while idle: being replaced
    heartbeat: float  # monotonic, written by its loop when it wakes up idle
    id: int  # the id it shows (stable across replacement)
    accept_backoffs: int  # pauses in accepting at the open-files limit
    log_lines_lost: int  # output lines it dropped because the master did not read

    def __getitem__(self, name: str) -> object:
        """``record["requests"]``: the field by name, for readers of the dict it was."""
        return getattr(self, name)


class Scoreboard:
    """Shared memory for ``slots`` workers; ``fd`` is set when backed by a memfd."""

    def __init__(self, slots: int = MAX_SLOTS, fd: Optional[int] = None) -> None:
        self.slots = slots
        self.hist_base = HEADER_SIZE + slots * SLOT_SIZE
        size = self.hist_base + (slots + 1) * HIST.size
        if fd is None and hasattr(os, "memfd_create"):
            # Close-on-exec: only the reload's exec keeps it (master/shell.py marks it then).
            fd = os.memfd_create("fcgi-manager-scoreboard", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        elif fd is not None and os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)  # adopted from an older version with a smaller layout
        self.fd = fd
        self._duration_writers: Dict[int, DurationWriter] = {}
        self.entries_off = size  # thread entries start after the histograms
        if fd is None:
            self.mem = mmap.mmap(-1, size)
        else:
            size = max(size, os.fstat(fd).st_size)  # after a reload: the entries too
            self.mem = mmap.mmap(fd, size)
        self.size = size

    # -- master side --------------------------------------------------------------------

    def read_header(self) -> Dict[str, float]:
        return dict(zip(HEADER_FIELDS, HEADER.unpack_from(self.mem, 0)))

    def write_header(self, values: Dict[str, float]) -> None:
        HEADER.pack_into(self.mem, 0, *(values[name] for name in HEADER_FIELDS))

    def set_draining(self, on: bool) -> None:
        (flags,) = FLAGS.unpack_from(self.mem, FLAGS_OFF)
        flags = flags | FLAG_DRAINING if on else flags & ~FLAG_DRAINING
        FLAGS.pack_into(self.mem, FLAGS_OFF, flags)

    def draining(self) -> bool:
        return bool(FLAGS.unpack_from(self.mem, FLAGS_OFF)[0] & FLAG_DRAINING)

    def assign(self, slot: int, pid: int, generation: int, worker_id: int = 0) -> None:
        """Give ``slot`` to a new worker (before it runs, so it is visible at once);
        ``worker_id`` is the id it shows (0: the slot's number + 1)."""
        off = HEADER_SIZE + slot * SLOT_SIZE
        self.mem[off : off + SLOT_SIZE] = bytes(SLOT_SIZE)
        hist = self._hist_off(slot)
        self.mem[hist : hist + HIST.size] = bytes(HIST.size)
        IDENT.pack_into(self.mem, off + IDENT_OFF, pid, generation, time.time())
        self.mem[off + REQ_OFF] = STATE_CODES[WorkerState.STARTING]
        EXTRA.pack_into(self.mem, off + EXTRA_OFF, time.monotonic(), worker_id or slot + 1,
                        0, 0)

    def worker_id(self, slot: int) -> int:
        """The id the worker in ``slot`` shows in status, logs, titles and metrics."""
        wid = EXTRA.unpack_from(self.mem, HEADER_SIZE + slot * SLOT_SIZE + EXTRA_OFF)[1]
        return wid or slot + 1

    def ident(self, slot: int) -> Tuple[int, int]:
        """(pid, generation) of ``slot``: who may hand connections on (``handoff.Gate``)."""
        pid, generation, _ = IDENT.unpack_from(self.mem, HEADER_SIZE + slot * SLOT_SIZE
                                               + IDENT_OFF)
        return pid, generation

    def set_pid(self, slot: int, pid: int) -> None:
        struct.pack_into("=i", self.mem, HEADER_SIZE + slot * SLOT_SIZE + IDENT_OFF, pid)

    def clear(self, slot: int) -> None:
        """Free ``slot`` (its worker is gone); its durations go to the retired histogram."""
        off = HEADER_SIZE + slot * SLOT_SIZE
        self.mem[off : off + SLOT_SIZE] = bytes(SLOT_SIZE)
        self._retire_histogram(slot)

    def _hist_off(self, index: int) -> int:
        return self.hist_base + index * HIST.size

    def _retire_histogram(self, slot: int) -> None:
        gone = HIST.unpack_from(self.mem, self._hist_off(slot))
        if any(gone):
            kept = HIST.unpack_from(self.mem, self._hist_off(self.slots))
            HIST.pack_into(self.mem, self._hist_off(self.slots),
                           *(a + b for a, b in zip(kept, gone)))
        self.mem[self._hist_off(slot) : self._hist_off(slot) + HIST.size] = bytes(HIST.size)

    def read_histogram(self) -> Tuple[List[int], float]:
        """The pool's request durations: cumulative counts per bucket (the last is +Inf,
        i.e. the total), and the sum in seconds. The retired one is read first: a slot freed
        while we read is then missed for one sample, never counted twice."""
        counts = [0] * N_BUCKETS
        total = 0.0
        mem = self.mem
        for index in (self.slots, *range(self.slots)):
            values = HIST.unpack_from(mem, self._hist_off(index))
            if any(values):
                for i in range(N_BUCKETS):
                    counts[i] += values[i]
                total += values[-1]
        running = 0
        for i in range(N_BUCKETS):
            running += counts[i]
            counts[i] = running
        return counts, total

    def bump_log_epoch(self) -> None:
        """Ask every worker to reopen its log files (logrotate moved them)."""
        self.mem[LOG_EPOCH_OFF] = (self.mem[LOG_EPOCH_OFF] + 1) & 0xFF

    def log_epoch(self) -> int:
        """The log-reopen counter (a worker's log file writer follows it from its start,
        before it has a slot writer)."""
        return self.mem[LOG_EPOCH_OFF]

    # -- thread entries (workers.threads > 1) --------------------------------------------

    def reserve_threads(self, slot: int, count: int) -> None:
        """Give the worker in ``slot`` ``count`` zeroed thread entries (before it forks).

        First fit among the ranges other slots hold; when none fits, the memfd grows. The
        master's mapping is replaced then; workers keep the mapping they were forked with,
        which covers their own entries (it is never shrunk).
        """
        ranges = sorted(r for r in (self._thread_range(s) for s in self.used_slots()
                                    if s != slot) if r[1])
        first = 0
        for start, n in ranges:
            if first + count <= start:
                break
            first = max(first, start + n)
        end = first + count
        if end > self.entry_capacity:
            self._grow(max(end, 2 * self.entry_capacity, MIN_ENTRIES))
        off = self.entries_off + first * ENTRY_SIZE
        self.mem[off : off + count * ENTRY_SIZE] = bytes(count * ENTRY_SIZE)
        THREADS.pack_into(self.mem, HEADER_SIZE + slot * SLOT_SIZE + THREADS_OFF, first, count)

    @property
    def entry_capacity(self) -> int:
        return (self.size - self.entries_off) // ENTRY_SIZE

    def _grow(self, entries: int) -> None:
        if self.fd is None:
            raise OSError("workers.threads needs memfd_create (Linux 3.17 or later)")
        size = self.entries_off + entries * ENTRY_SIZE
        os.ftruncate(self.fd, size)
        self.mem = mmap.mmap(self.fd, size)
        self.size = size

    def _thread_range(self, slot: int) -> tuple:
        return THREADS.unpack_from(self.mem, HEADER_SIZE + slot * SLOT_SIZE + THREADS_OFF)

    def thread_writers(self, slot: int) -> List[ThreadSlotWriter]:
        """One writer per reserved entry of ``slot`` (in the worker, after fork)."""
        first, count = self._thread_range(slot)
        self._map_entries(first + count)
        durations = self.duration_writer(slot)
        durations.lock = threading.Lock()
        return [ThreadSlotWriter(self, first + i, durations) for i in range(count)]

    def duration_writer(self, slot: int) -> DurationWriter:
        """The histogram writer of ``slot`` (one per worker process, whoever asks)."""
        writer = self._duration_writers.get(slot)
        if writer is None or writer.mem is not self.mem:
            writer = self._duration_writers[slot] = DurationWriter(self, slot)
        return writer

    def _map_entries(self, entries: int) -> None:
        """Map the file again when it grew after this process mapped it: a worker forked
        by the zygote (``manager.user``) inherits the zygote's mapping, made before the
        master grew the file for this worker's thread entries."""
        size = self.entries_off + entries * ENTRY_SIZE
        if size > len(self.mem) and self.fd is not None:
            self.mem = mmap.mmap(self.fd, max(size, os.fstat(self.fd).st_size))
            self.size = len(self.mem)

    def _read_entry(self, index: int) -> Optional[tuple]:
        """(busy_since, method, uri, requests, shed) of one entry; None past the mapping
        (an entry reserved after this process mapped the board)."""
        off = self.entries_off + index * ENTRY_SIZE
        if off + ENTRY_SIZE > len(self.mem):
            return None
        for _ in range(50):
            state, requests, busy_since, method, uri, shed = ENTRY.unpack_from(self.mem, off)
            if state != _BUSY or busy_since > 0.0:
                break
        else:
            busy_since = time.monotonic()
        return (busy_since if state == _BUSY else 0.0, method, uri, requests, shed)

    def write_sample(self, slot: int, rss: int, cpu: float) -> None:
        SAMPLE.pack_into(self.mem, HEADER_SIZE + slot * SLOT_SIZE + SAMPLE_OFF, rss, cpu, 0.0)

    def mark_slow_dumped(self, slot: int, request_no: int) -> None:
        off = HEADER_SIZE + slot * SLOT_SIZE + COUNTERS_OFF + 8
        struct.pack_into("=I", self.mem, off, request_no & 0xFFFFFFFF)

    def mark_stopping(self, slot: int) -> None:
        """The master asked this worker to stop: status shows it ``stopping`` from now on,
        whatever the worker writes while it finishes its request (a flag of the master's
        own, so the worker's idle/busy writes never undo it)."""
        off = HEADER_SIZE + slot * SLOT_SIZE + COUNTERS_OFF + 12
        (flag,) = struct.unpack_from("=I", self.mem, off)
        if flag != STOP_FLAG_STUCK:
            struct.pack_into("=I", self.mem, off, STOP_FLAG_STOPPING)

    def mark_stuck(self, slot: int) -> None:
        """An idle worker missed its heartbeat for workers.timeout: status shows ``stuck``
        until it is reaped."""
        off = HEADER_SIZE + slot * SLOT_SIZE + COUNTERS_OFF + 12
        struct.pack_into("=I", self.mem, off, STOP_FLAG_STUCK)

    def read_slot(self, slot: int) -> SlotRecord:
        off = HEADER_SIZE + slot * SLOT_SIZE
        mem = self.mem
        pid, generation, started_at = IDENT.unpack_from(mem, off + IDENT_OFF)
        for _ in range(50):
            state, requests, busy_since, method, uri = REQ.unpack_from(mem, off + REQ_OFF)
            if state != _BUSY or busy_since > 0.0:
                break
            # Read in the middle of the worker's write: "busy" with the start time of the
            # idle record (0): the request would look as old as the machine's uptime and
            # the master would kill the worker for workers.timeout. Read again.
        else:
            busy_since = time.monotonic()  # the writer is paused mid-write: it just began
        rss, cpu, _ = SAMPLE.unpack_from(mem, off + SAMPLE_OFF)
        shed, slow_dumped, stop_requested = COUNTERS.unpack_from(mem, off + COUNTERS_OFF)
        first, threads = THREADS.unpack_from(mem, off + THREADS_OFF)
        heartbeat, worker_id, backoffs, lost = EXTRA.unpack_from(mem, off + EXTRA_OFF)
        if threads:
            # A threaded worker: its slot holds the state, its entries the requests.
            flights = []
            for index in range(first, first + threads):
                entry = self._read_entry(index)
                if entry is None:
                    continue
                requests += entry[3]
                shed += entry[4]
                if entry[0]:
                    flights.append(entry[:3])
            flights.sort(key=lambda f: f[0])
            if flights and state == _IDLE:
                state = _BUSY
            busy_since, method, uri = flights[0] if flights else (0.0, b"", b"")
        else:
            flights = [(busy_since, method, uri)] if state == _BUSY else []
        return SlotRecord(
            slot=slot,
            pid=pid,
            generation=generation,
            started_at=started_at,
            state=STATE_NAMES.get(state, WorkerState.STARTING),
            requests=requests,
            busy_since=busy_since,
            method=method.rstrip(b"\0").decode("latin-1", "replace"),
            uri=uri.rstrip(b"\0").decode("utf-8", "replace"),
            rss=rss,
            cpu=cpu,
            shed=shed,
            slow_dumped=slow_dumped,
            threads=threads or 1,
            in_flight=[(since, m.rstrip(b"\0").decode("latin-1", "replace"),
                        u.rstrip(b"\0").decode("utf-8", "replace"))
                       for since, m, u in flights],
            stopping=bool(stop_requested),
            stuck=stop_requested == STOP_FLAG_STUCK,
            heartbeat=heartbeat,
            id=worker_id or slot + 1,
            accept_backoffs=backoffs,
            log_lines_lost=lost,
        )

    def used_slots(self) -> Iterator[int]:
        mem = self.mem
        for slot in range(self.slots):
            off = HEADER_SIZE + slot * SLOT_SIZE
            if mem[off : off + 4] != b"\0\0\0\0":
                yield slot

    def read_all(self) -> List[SlotRecord]:
        return [self.read_slot(s) for s in self.used_slots()]

    def close(self) -> None:
        self.mem.close()
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass


class DurationWriter:
    """A worker's request-duration histogram in its slot's hist[] (see the module
    docstring). The worker keeps its own copy of the counts, so nothing is read back:
    counting one request is two stores into shared memory. A threaded worker's threads
    share one, under :attr:`lock`."""

    __slots__ = ("mem", "off", "counts", "total", "lock")

    def __init__(self, board: Scoreboard, slot: int) -> None:
        self.mem = board.mem
        self.off = board._hist_off(slot)
        self.counts = [0] * N_BUCKETS
        self.total = 0.0
        self.lock: Optional[threading.Lock] = None

    def observe(self, seconds: float) -> None:
        if self.lock is not None:
            with self.lock:
                self._observe(seconds)
        else:
            self._observe(seconds)

    def _observe(self, seconds: float) -> None:
        i = bisect_left(DURATION_BUCKETS, seconds)
        counts = self.counts
        counts[i] = count = counts[i] + 1
        _COUNT.pack_into(self.mem, self.off + 8 * i, count)
        self.total = total = self.total + seconds
        _SUM.pack_into(self.mem, self.off + HIST_SUM_OFF, total)


class SlotWriter:
    """A worker's handle on its own slot: the writes of the request path."""

    __slots__ = ("mem", "off", "requests", "_req_off", "shed", "busy_since", "durations",
                 "backoffs")

    def __init__(self, board: Scoreboard, slot: int) -> None:
        self.mem = board.mem
        self.off = HEADER_SIZE + slot * SLOT_SIZE
        self._req_off = self.off + REQ_OFF
        self.requests = 0
        self.shed = 0
        self.busy_since = 0.0
        self.durations = board.duration_writer(slot)
        self.backoffs = 0

    def busy(self, method: str, uri: str) -> None:
        self.busy_since = now = time.monotonic()
        REQ.pack_into(
            self.mem, self._req_off, _BUSY, self.requests, now,
            method.encode("latin-1", "replace"), uri.encode("latin-1", "replace")[:200],
        )

    def idle(self) -> None:
        self.requests += 1
        IDLE.pack_into(self.mem, self._req_off, _IDLE, self.requests, 0.0)
        self.durations.observe(time.monotonic() - self.busy_since)

    def set_state(self, state: WorkerState) -> None:
        self.mem[self._req_off] = STATE_CODES[state]

    def draining(self) -> bool:
        """Has the master been asked to stop? (one read of shared memory: no IPC)"""
        return bool(FLAGS.unpack_from(self.mem, FLAGS_OFF)[0] & FLAG_DRAINING)

    def log_epoch(self) -> int:
        """The master's log-reopen counter (see :meth:`Scoreboard.bump_log_epoch`)."""
        return self.mem[LOG_EPOCH_OFF]

    def count_shed(self) -> None:
        self.shed += 1
        struct.pack_into("=Q", self.mem, self.off + COUNTERS_OFF, self.shed)

    def beat(self, now: float) -> None:
        """The worker's loop is alive (written when it wakes up idle, and at each sweep:
        never per request). The master replaces an idle worker whose beat stops."""
        _BEAT.pack_into(self.mem, self.off + EXTRA_OFF, now)

    def count_backoff(self) -> None:
        self.backoffs += 1
        _U32.pack_into(self.mem, self.off + EXTRA_OFF + 12, self.backoffs)

    def set_lost_lines(self, lost: int) -> None:
        _U32.pack_into(self.mem, self.off + EXTRA_OFF + 16, lost & 0xFFFFFFFF)

    def leaving(self) -> None:
        """This worker stopped accepting on its own: status shows it ``stopping`` at once
        (the master sets the same flag when it hears of it; both write 1)."""
        struct.pack_into("=I", self.mem, self.off + COUNTERS_OFF + 12, STOP_FLAG_STOPPING)


class ThreadSlotWriter:
    """One app thread's handle on its own thread entry (workers.threads > 1).

    The same two writes per request as :class:`SlotWriter`, into an entry no other thread
    writes; the shed count lives in the entry too, so no counter is shared between threads.
    """

    __slots__ = ("mem", "off", "requests", "shed", "busy_since", "durations")

    def __init__(self, board: Scoreboard, index: int, durations: DurationWriter) -> None:
        self.mem = board.mem
        self.off = board.entries_off + index * ENTRY_SIZE
        self.requests = 0
        self.shed = 0
        self.busy_since = 0.0
        self.durations = durations

    def busy(self, method: str, uri: str) -> None:
        self.busy_since = now = time.monotonic()
        REQ.pack_into(
            self.mem, self.off, _BUSY, self.requests, now,
            method.encode("latin-1", "replace"), uri.encode("latin-1", "replace")[:200],
        )

    def idle(self) -> None:
        self.requests += 1
        IDLE.pack_into(self.mem, self.off, _IDLE, self.requests, 0.0)
        self.durations.observe(time.monotonic() - self.busy_since)

    def count_shed(self) -> None:
        self.shed += 1
        struct.pack_into("=Q", self.mem, self.off + ENTRY_SHED_OFF, self.shed)
