"""The supervisor's rules on event sequences: no processes, no clock, no sockets.

Each test feeds ``fcgi_manager.rules.supervisor.Supervisor`` the events a master would see (a
worker spawned, ready, exited; ticks with what the scoreboard shows; samples; commands)
and checks the actions it asks for. The supervisor runs ``strict``: an illegal state or
phase change raises, so every sequence here also proves the transition tables hold.
"""

from __future__ import annotations

import signal
import typing
from typing import Any, Dict, List, Optional, Type

import pytest

from fcgi_manager.config import WorkersConfig
from fcgi_manager.rules import supervisor as sv
from fcgi_manager.wire.codes import EXIT_BOOT_ERROR, EXIT_RECYCLE_MEMORY, STACK_SIGNAL
from fcgi_manager.wire.states import WorkerState

STOPPING = {"stopping": True, "pid": 1, "drain_s": 0.0}  # the reply to ``stop``


def exited(code: int) -> int:
    """A wait status: exited with ``code``."""
    return code << 8


def killed(sig: int) -> int:
    """A wait status: killed by ``sig``."""
    return int(sig)


class Sim:
    """A master without processes: performs Spawn by inventing pids, records actions."""

    def __init__(self, in_place: bool = False, **workers: Any) -> None:
        workers.setdefault("count", 2)
        self.cfg = WorkersConfig(**workers)
        self.sup = sv.Supervisor(self.cfg, master_pid=1, max_slots=16, log_path="m.log",
                                 in_place_reload=in_place, strict=True)
        self.now = 100.0
        self.next_pid = 1000
        self.actions: List[Any] = []

    def feed(self, event: Any) -> List[Any]:
        out: List[Any] = []
        queue = [event]
        while queue:
            for action in self.sup.handle(queue.pop(0)):
                out.append(action)
                if isinstance(action, sv.Spawn):
                    self.next_pid += 1
                    queue.append(sv.Spawned(action.slot, self.next_pid, self.now))
        self.actions += out
        return out

    # -- shorthands --------------------------------------------------------------------

    def start(self) -> List[Any]:
        return self.feed(sv.Started(self.now))

    def pids(self, state: Optional[WorkerState] = None, generation: Optional[int] = None
             ) -> List[int]:
        return sorted(pid for pid, w in self.sup.workers.items()
                      if (state is None or w.state is state)
                      and (generation is None or w.generation == generation))

    def ready(self, *pids: int) -> List[Any]:
        out: List[Any] = []
        for pid in pids or self.pids(WorkerState.STARTING):
            out += self.feed(sv.WorkerReady(pid, self.now))
        return out

    def running(self) -> List[int]:
        self.start()
        self.ready()
        assert self.sup.phase is sv.Phase.RUNNING
        return self.pids()

    def exit(self, pid: int, status: int = 0, requests: int = 0) -> List[Any]:
        return self.feed(sv.WorkerExited(pid, status, self.now, requests))

    def tick(self, after: float = 0.25, slots: Optional[Dict[int, sv.SlotView]] = None,
             queue: int = -1, waiting: bool = False) -> List[Any]:
        self.now += after
        return self.feed(sv.Tick(self.now, slots or {}, queue, waiting))

    def command(self, name: str, client: Any = "cli", **args: Any) -> List[Any]:
        return self.feed(sv.Command(name, args, client, self.now))


def of(kind: Type[Any], actions: List[Any]) -> List[Any]:
    return [a for a in actions if isinstance(a, kind)]


def signals(actions: List[Any], sig: int) -> List[int]:
    return sorted(a.pid for a in of(sv.Signal, actions) if a.sig == sig)


def logged(actions: List[Any], text: str) -> bool:
    return any(text in a.message for a in of(sv.Log, actions))


def idle(requests: int = 1) -> sv.SlotView:
    return sv.SlotView(busy=False, requests=requests)


# -- start -----------------------------------------------------------------------------------


def test_start_spawns_the_pool_and_reports_ready_once_all_are_ready() -> None:
    sim = Sim(count=3)
    spawned = of(sv.Spawn, sim.start())
    assert [(s.slot, s.generation) for s in spawned] == [(0, 1), (1, 1), (2, 1)]
    first, second, third = sim.pids()
    assert not of(sv.ReportReady, sim.ready(first, second))
    assert sim.sup.phase is sv.Phase.STARTING
    assert of(sv.ReportReady, sim.ready(third)) == [sv.ReportReady(True)]
    assert sim.sup.phase is sv.Phase.RUNNING


def test_boot_error_at_start_halts_instead_of_respawning() -> None:
    sim = Sim(count=2)
    sim.start()
    first, second = sim.pids()
    sim.feed(sv.WorkerBootError(first, "ImportError: no module named nope"))
    out = sim.exit(first, exited(EXIT_BOOT_ERROR))
    assert of(sv.ReportReady, out) == [sv.ReportReady(False, "ImportError: no module named nope")]
    assert not of(sv.Spawn, out)
    assert sim.sup.phase is sv.Phase.STOPPING and sim.sup.exit_code == 1
    assert signals(out, signal.SIGINT) == [second]
    assert of(sv.Exit, sim.exit(second, exited(0))) == [sv.Exit(1)]


def test_workers_dying_before_ready_end_the_start_after_the_limit() -> None:
    sim = Sim(count=1)
    sim.start()
    for attempt in range(1, 6):
        (pid,) = sim.pids()
        out = sim.exit(pid, killed(signal.SIGSEGV))
        if attempt < 5:
            assert not of(sv.ReportReady, out)
            while not sim.pids():  # the backoff: the next one starts a little later
                sim.tick()
    failed = of(sv.ReportReady, out)
    assert len(failed) == 1 and not failed[0].ok
    assert "keep dying before they are ready" in failed[0].text and "m.log" in failed[0].text


# -- crash loop and backoff ------------------------------------------------------------------


def test_crash_loop_backs_off_then_recovers_when_a_worker_is_healthy() -> None:
    sim = Sim(count=1)
    sim.running()
    (pid,) = sim.pids()
    # First quick failure: replaced at once.
    out = sim.exit(pid, exited(1))
    assert len(of(sv.Spawn, out)) == 1 and sim.sup.totals["crashes"] == 1
    (pid,) = sim.pids()
    sim.ready(pid)
    # Second quick failure in a row: the next start waits.
    out = sim.exit(pid, exited(1))
    assert not of(sv.Spawn, out)
    assert logged(out, "failing quickly (2 in a row): waiting 0.2 s")
    assert not of(sv.Spawn, sim.tick(after=0.1))
    out = sim.tick(after=0.15)
    assert len(of(sv.Spawn, out)) == 1
    assert sim.sup.totals["respawns"] == 2
    # Third: a longer wait.
    (pid,) = sim.pids()
    sim.ready(pid)
    out = sim.exit(pid, killed(signal.SIGKILL))
    assert logged(out, "waiting 0.4 s") and logged(out, "crash the interpreter")
    sim.tick(after=0.5)
    (pid,) = sim.pids()
    sim.ready(pid)
    # A worker that serves a request ends the run of failures.
    out = sim.tick(slots={pid: idle(requests=1)})
    assert logged(out, "is healthy: no more backoff")
    assert sim.sup.restarts.failures == 0 and sim.sup.next_start_at == 0.0


def test_a_worker_that_served_requests_is_no_crash_loop() -> None:
    sim = Sim(count=1)
    sim.running()
    for _ in range(4):
        (pid,) = sim.pids()
        out = sim.exit(pid, exited(1), requests=10)
        assert len(of(sv.Spawn, out)) == 1  # replaced at once, every time
        sim.ready()
    assert sim.sup.restarts.failures == 0 and sim.sup.totals["crashes"] == 4


def test_boot_error_after_start_retries_with_backoff() -> None:
    sim = Sim(count=1)
    sim.running()
    (pid,) = sim.pids()
    sim.exit(pid, exited(1))  # a crash: its replacement cannot import the app (a deploy)
    (pid,) = sim.pids()
    sim.feed(sv.WorkerBootError(pid, "SyntaxError: bad"))
    out = sim.exit(pid, exited(EXIT_BOOT_ERROR))
    assert logged(out, "could not import the app; retrying with backoff")
    assert not of(sv.Spawn, out) and sim.sup.next_start_at > sim.now
    assert sim.sup.phase is sv.Phase.RUNNING


def test_an_unknown_pid_is_only_logged() -> None:
    """Reaping is the shell's; a pid that was no worker (an orphan reaped as PID 1)
    changes nothing."""
    sim = Sim(count=1)
    sim.running()
    out = sim.exit(424242, exited(0))
    assert [type(a) for a in out] == [sv.Log]
    assert logged(out, "reaped pid 424242, not a worker (a process the app left behind) "
                       "that exited with code 0")


# -- stop ----------------------------------------------------------------------------------


def test_graceful_stop_waits_then_kills_the_straggler() -> None:
    sim = Sim(count=2, graceful_timeout=10)
    first, second = sim.running()
    out = sim.command("stop")
    assert of(sv.NotifySystemd, out) == [sv.NotifySystemd("STOPPING=1")]
    assert of(sv.CloseListener, out) == [sv.CloseListener()]
    assert signals(out, signal.SIGTERM) == [first, second]
    assert sorted(a.slot for a in of(sv.MarkStopping, out)) == [0, 1]
    assert of(sv.Reply, out) == [sv.Reply("cli", True, STOPPING)]
    assert all(w.state is WorkerState.STOPPING for w in sim.sup.workers.values())
    assert not of(sv.Spawn, sim.exit(first, exited(0)))
    assert not signals(sim.tick(after=9.0), signal.SIGKILL)
    out = sim.tick(after=1.5)
    assert signals(out, signal.SIGKILL) == [second]
    assert logged(out, "did not exit within graceful_timeout (stop)")
    assert of(sv.Exit, sim.exit(second, killed(signal.SIGKILL))) == [sv.Exit(0)]


def test_stop_now_after_a_graceful_stop_escalates() -> None:
    sim = Sim(count=1, graceful_timeout=30)
    (pid,) = sim.running()
    sim.command("stop")
    out = sim.command("stop", now=True)
    assert signals(out, signal.SIGINT) == [pid]
    assert signals(sim.tick(), signal.SIGKILL) == [pid]  # no grace left
    assert sim.command("stop")[-1] == sv.Reply("cli", True, STOPPING)


def test_shutdown_delay_drains_then_stops_gracefully() -> None:
    sim = Sim(count=1)
    sim.sup.shutdown_delay = 5.0
    (pid,) = sim.running()
    out = sim.command("stop")
    assert sv.SetDraining() in out and sv.NotifySystemd("STOPPING=1") in out
    assert of(sv.Reply, out)[0].result["drain_s"] == 5.0
    assert not of(sv.Signal, out) and not of(sv.CloseListener, out)
    assert sim.sup.phase is sv.Phase.DRAINING
    assert logged(sim.command("stop"), "already draining: the graceful stop begins in 5.0 s")
    (reply,) = of(sv.Reply, sim.command("reload"))
    assert not reply.ok and "stopping" in reply.error
    # Still a pool while draining: a dead worker is replaced.
    assert len(of(sv.Spawn, sim.exit(pid, killed(signal.SIGKILL), requests=3))) == 1
    sim.ready()
    assert not of(sv.Signal, sim.tick(after=4.0))
    out = sim.tick(after=1.5)
    assert logged(out, "shutdown_delay is over: stopping gracefully")
    assert signals(out, signal.SIGTERM) == sim.pids() and sv.CloseListener() in out
    assert sim.sup.phase is sv.Phase.STOPPING


def test_stop_now_cuts_the_drain_short() -> None:
    sim = Sim(count=1)
    sim.sup.shutdown_delay = 60.0
    (pid,) = sim.running()
    sim.command("stop")
    out = sim.command("stop", now=True)
    assert signals(out, signal.SIGINT) == [pid] and sim.sup.phase is sv.Phase.STOPPING


# -- timeouts ------------------------------------------------------------------------------


def test_a_hung_request_gets_a_stack_dump_then_kill_and_a_replacement() -> None:
    sim = Sim(count=1, timeout=60)
    (pid,) = sim.running()
    hung = sv.SlotView(busy=True, busy_since=sim.now - 61, requests=3, what="GET /hang")
    out = sim.tick(slots={pid: hung})
    assert signals(out, STACK_SIGNAL) == [pid]
    assert of(sv.MarkStopping, out) == [sv.MarkStopping(0)]
    assert logged(out, "has run GET /hang for 61 s, past workers.timeout")
    assert len(of(sv.Spawn, out)) == 1  # its replacement starts at once
    assert sim.sup.totals["timeouts"] == 1
    assert not signals(sim.tick(after=0.5, slots={pid: hung}), signal.SIGKILL)
    out = sim.tick(after=0.6, slots={pid: hung})
    assert signals(out, signal.SIGKILL) == [pid]
    assert logged(out, "killing it now that its stack is logged")
    out = sim.exit(pid, killed(signal.SIGKILL))
    assert logged(out, "after its request ran past workers.timeout")
    assert sim.sup.totals["crashes"] == 0 and sim.sup.totals["respawns"] == 1


def test_a_slow_request_dumps_its_stack_once() -> None:
    sim = Sim(count=1, slow_request=2.0)
    (pid,) = sim.running()
    slow = sv.SlotView(busy=True, busy_since=sim.now - 3, requests=4, what="GET /slow")
    out = sim.tick(slots={pid: slow})
    assert signals(out, STACK_SIGNAL) == [pid]
    assert of(sv.MarkSlowDumped, out) == [sv.MarkSlowDumped(0, 5)]
    dumped = slow._replace(slow_dumped=5)
    assert not signals(sim.tick(slots={pid: dumped}), STACK_SIGNAL)
    assert sim.sup.totals["slow"] == 1 and sim.sup.workers[pid].state is WorkerState.BUSY


# -- reload --------------------------------------------------------------------------------


def _resumed(sim: Sim, generation: int = 1) -> sv.Supervisor:
    """What the re-executed master sees: the old workers adopted, idle and ready."""
    new = sv.Supervisor(sim.cfg, master_pid=1, max_slots=16, strict=True)
    adopted = tuple(sv.AdoptedWorker(w.slot, w.pid, w.generation, w.started, True, w.id)
                    for w in sim.sup.workers.values())
    sim.sup = new
    sim.feed(sv.Resumed(adopted, generation, ("cli",), sim.now))
    return new


def test_reload_checks_then_reexecs_and_retires_the_old_generation() -> None:
    sim = Sim(count=2)
    old = sim.running()
    out = sim.command("reload")
    assert of(sv.Validate, out) == [sv.Validate()]
    assert of(sv.NotifySystemd, out) == [sv.NotifySystemd("RELOADING=1")]
    assert sim.sup.phase is sv.Phase.RELOADING
    assert sim.command("reload", client="second") == []  # joins the reload in progress
    assert of(sv.ReExec, sim.feed(sv.ValidationDone(True, "", sim.now))) == [sv.ReExec()]
    # The new image:
    _resumed(sim)
    out = sim.start()
    assert [(s.slot, s.generation) for s in of(sv.Spawn, out)] == [(2, 2), (3, 2)]
    new = sim.pids(generation=2)
    out = sim.ready(new[0])
    assert not signals(out, signal.SIGTERM)
    out = sim.ready(new[1])
    assert signals(out, signal.SIGTERM) == old
    assert sorted(a.slot for a in of(sv.MarkStopping, out)) == [0, 1]
    assert of(sv.Reply, out) == [sv.Reply("cli", True, {"generation": 2, "workers": 2})]
    assert of(sv.NotifySystemd, out) == [sv.NotifySystemd("READY=1")]
    assert sim.sup.phase is sv.Phase.RUNNING and sim.sup.generation == 2
    for pid in old:
        assert logged(sim.exit(pid, exited(0)), "(reload)")
    assert sim.sup.totals["crashes"] == 0


@pytest.mark.parametrize("why", [
    "config error: /etc/app.toml: workers.count: expected an integer",
    "Traceback (most recent call last):\nSyntaxError: invalid syntax",
])
def test_reload_refused_keeps_the_old_generation(why: str) -> None:
    sim = Sim(count=2)
    before = sim.running()
    sim.command("reload")
    sim.command("reload", client="second")
    out = sim.feed(sv.ValidationDone(False, why, sim.now))
    replies = of(sv.Reply, out)
    assert [r.client for r in replies] == ["cli", "second"]
    assert all(not r.ok and why in r.error and "old workers keep serving" in r.error
               for r in replies)
    assert not of(sv.Signal, out) and not of(sv.Spawn, out) and not of(sv.ReExec, out)
    assert sim.pids() == before and sim.sup.generation == 1
    assert sim.sup.phase is sv.Phase.RUNNING
    assert of(sv.NotifySystemd, out) == [sv.NotifySystemd("READY=1")]


def test_new_generation_that_cannot_import_fails_the_reload() -> None:
    sim = Sim(count=2)
    old = sim.running()
    _resumed(sim)
    sim.start()
    new = sim.pids(generation=2)
    sim.feed(sv.WorkerBootError(new[0], "ImportError: gone"))
    out = sim.exit(new[0], exited(EXIT_BOOT_ERROR))
    assert signals(out, signal.SIGKILL) == [new[1]]
    (reply,) = of(sv.Reply, out)
    assert not reply.ok and "reload failed" in reply.error and "ImportError: gone" in reply.error
    assert sim.sup.generation == 1 and sim.pids(generation=1) == old
    assert not of(sv.Signal, out)[1:]  # nothing for the old workers


def test_a_reload_check_that_never_ends_is_cancelled() -> None:
    sim = Sim(count=1)
    sim.running()
    sim.command("reload")
    out = sim.tick(after=sv.READY_TIMEOUT + 1)
    assert of(sv.CancelValidation, out) == [sv.CancelValidation()]
    (reply,) = of(sv.Reply, out)
    assert not reply.ok and "longer than 120 s" in reply.error


def test_a_worker_killed_while_the_reload_check_runs_is_replaced_at_once() -> None:
    sim = Sim(count=2)
    first, second = sim.running()
    sim.command("reload")
    out = sim.exit(first, killed(signal.SIGKILL), requests=5)
    assert [(s.slot, s.generation) for s in of(sv.Spawn, out)] == [(0, 1)]
    assert sim.sup.phase is sv.Phase.RELOADING
    assert of(sv.ReExec, sim.feed(sv.ValidationDone(True, "", sim.now))) == [sv.ReExec()]


def test_an_old_worker_dying_while_the_new_generation_starts_is_not_replaced_twice() -> None:
    sim = Sim(count=2)
    old = sim.running()
    _resumed(sim)
    sim.start()
    out = sim.exit(old[0], killed(signal.SIGKILL), requests=5)
    assert not of(sv.Spawn, out)  # the new generation is already on its way
    assert sim.sup.totals["crashes"] == 1
    out = sim.ready()
    assert signals(out, signal.SIGTERM) == [old[1]]


def test_reload_is_refused_while_starting_or_stopping() -> None:
    sim = Sim(count=1)
    sim.start()
    (reply,) = of(sv.Reply, sim.command("reload"))
    assert not reply.ok and "still starting" in reply.error
    sim.ready()
    sim.command("stop")
    (reply,) = of(sv.Reply, sim.command("reload"))
    assert not reply.ok and "stopping" in reply.error


def test_stop_during_a_reload_cancels_the_check_and_answers_the_waiters() -> None:
    sim = Sim(count=1)
    sim.running()
    sim.command("reload")
    out = sim.command("stop", client="stopper")
    assert of(sv.CancelValidation, out) == [sv.CancelValidation()]
    assert sv.Reply("cli", False, error="the master is stopping") in out


def test_in_place_reload_forks_a_new_generation() -> None:
    sim = Sim(in_place=True, count=2)
    old = sim.running()
    out = sim.command("reload")
    assert not of(sv.Validate, out)
    assert [s.generation for s in of(sv.Spawn, out)] == [2, 2]
    out = sim.ready()
    assert signals(out, signal.SIGTERM) == old
    assert of(sv.Reply, out)[0].ok


def test_scale_during_a_reload_sizes_the_new_generation() -> None:
    sim = Sim(count=2)
    sim.running()
    _resumed(sim)
    sim.start()
    out = sim.command("scale", value="3")
    assert of(sv.Reply, out) == [sv.Reply("cli", True, {"workers": 3, "was": 2})]
    assert [s.generation for s in of(sv.Spawn, out)] == [2]
    out = sim.ready(*sim.pids(generation=2)[:2])
    assert not of(sv.Reply, out)  # two of three are not enough
    out = sim.ready()
    assert of(sv.Reply, out)[0].result == {"generation": 2, "workers": 3}


# -- scale and pool sizing -------------------------------------------------------------------


def test_scale_checks_its_argument_and_retires_idle_workers_first() -> None:
    sim = Sim(count=3)
    pids = sim.running()
    assert not of(sv.Reply, sim.command("scale", value="x"))[0].ok
    assert not of(sv.Reply, sim.command("scale", value="0"))[0].ok
    assert not of(sv.Reply, sim.command("scale", value="+99"))[0].ok
    busy = sv.SlotView(busy=True, busy_since=sim.now, requests=1, what="GET /")
    sim.tick(slots={pids[2]: busy, pids[0]: idle(), pids[1]: idle()})
    out = sim.command("scale", value="-2")
    assert signals(out, signal.SIGTERM) == pids[:2]  # idle ones, the newest first
    assert sim.sup.target == 1


def test_dynamic_pool_grows_for_spare_workers_and_shrinks_gently() -> None:
    sim = Sim(mode="dynamic", count=1, min_spare=1, max_spare=1, max_workers=4)
    (first,) = sim.running()
    busy = sv.SlotView(busy=True, busy_since=sim.now, requests=1, what="GET /")
    out = sim.tick(slots={first: busy})
    assert len(of(sv.Spawn, out)) == 1  # no spare worker left: one more
    sim.ready()
    second = sim.pids()[1]
    out = sim.tick(slots={first: busy, second: idle(0)}, queue=3)
    assert len(of(sv.Spawn, out)) == 2  # connections waiting count as demand (rate 2)
    sim.ready()
    everyone = {pid: idle(0) for pid in sim.pids()}
    out = sim.tick(after=1.0, slots=everyone)
    assert len(signals(out, signal.SIGTERM)) == 1  # above max_spare: one per second
    assert not signals(sim.tick(after=0.25, slots=everyone), signal.SIGTERM)


def test_ondemand_pool_forks_on_a_waiting_connection_and_retires_when_idle() -> None:
    sim = Sim(mode="ondemand", count=1, max_workers=2, idle_timeout=10)
    out = sim.start()
    assert of(sv.ReportReady, out) == [sv.ReportReady(True)]  # nothing to wait for
    out = sim.tick(waiting=True)
    assert len(of(sv.Spawn, out)) == 1
    (pid,) = sim.pids()
    sim.ready(pid)
    assert sv.WatchListener(False) in sim.tick(slots={pid: idle(0)})
    out = sim.tick(after=10.5, slots={pid: idle(0)})
    assert signals(out, signal.SIGTERM) == [pid]
    assert sv.WatchListener(True) in out  # none idle now: the master watches again


# -- max_memory ------------------------------------------------------------------------------


def test_an_idle_worker_over_max_memory_is_recycled_from_the_samples() -> None:
    sim = Sim(count=2, max_memory=64 << 20)
    first, second = sim.running()
    sim.tick(slots={first: idle(1), second: idle(1)})
    out = sim.feed(sv.Sample(sim.now, {first: 121 << 20, second: 30 << 20}))
    assert signals(out, signal.SIGTERM) == [first]
    assert of(sv.MarkStopping, out) == [sv.MarkStopping(0)]
    assert logged(out, "is idle at 121 MiB, over workers.max_memory (64 MiB)")
    assert len(of(sv.Spawn, out)) == 1  # its replacement starts at once
    out = sim.exit(first, exited(0))
    assert logged(out, "recycled (max_memory)") and sim.sup.totals["recycled"] == 1
    assert sim.sup.totals["crashes"] == 0


def test_max_memory_leaves_busy_and_fresh_workers_to_themselves() -> None:
    sim = Sim(count=2, max_memory=64 << 20)
    first, second = sim.running()
    busy = sv.SlotView(busy=True, busy_since=sim.now, requests=1, what="GET /")
    sim.tick(slots={first: busy, second: idle(0)})
    out = sim.feed(sv.Sample(sim.now, {first: 200 << 20, second: 200 << 20}))
    assert not of(sv.Signal, out)
    assert logged(out, "a fresh worker uses 200 MiB")  # once: recycling it would loop
    assert not logged(sim.feed(sv.Sample(sim.now, {second: 200 << 20})), "fresh worker")
    # The worker's own check (exit code 11) is a recycle too.
    out = sim.exit(first, exited(EXIT_RECYCLE_MEMORY))
    assert logged(out, "recycled (max_memory)")


# -- leaving on its own (max_requests, max_memory) -------------------------------------------


def test_a_worker_that_leaves_on_its_own_is_replaced_before_it_exits() -> None:
    sim = Sim(count=2, timeout=30, graceful_timeout=10)
    first, second = sim.running()
    out = sim.feed(sv.WorkerLeaving(first, "max_requests", sim.now))
    assert len(of(sv.Spawn, out)) == 1  # now, not when its slow requests are done
    assert of(sv.MarkStopping, out) == [sv.MarkStopping(0)]
    assert not of(sv.Signal, out)  # it leaves by itself
    assert sim.sup.workers[first].state is WorkerState.STOPPING
    assert logged(out, "stopped accepting (max_requests)")
    busy = sv.SlotView(busy=True, busy_since=sim.now, requests=3, what="GET /slow",
                       threads=4, in_flight=2)
    out = sim.tick(after=20, slots={first: busy, second: idle(1)})  # past graceful_timeout
    assert not of(sv.Signal, out) and not of(sv.Spawn, out)
    out = sim.exit(first, exited(10), requests=5)
    assert not of(sv.Spawn, out)  # its replacement is already there
    assert sim.sup.totals["recycled"] == 1 and sim.sup.totals["crashes"] == 0
    # Still there after its requests had every second they may take: killed.
    third = max(sim.pids())
    sim.ready(third)
    sim.feed(sv.WorkerLeaving(second, "max_memory", sim.now))
    out = sim.tick(after=31 + sv.STACK_GRACE)
    assert signals(out, signal.SIGKILL) == [second]


def test_every_worker_recycling_at_once_never_makes_a_spawn_loop() -> None:
    sim = Sim(count=2)
    sim.running()
    spawned = 0
    for _ in range(5):  # every worker, and every replacement, leaves while it still serves
        for pid in sim.pids(WorkerState.IDLE) + sim.pids(WorkerState.STARTING):
            if sim.sup.workers[pid].state is WorkerState.STARTING:
                sim.ready(pid)
            spawned += len(of(sv.Spawn, sim.feed(sv.WorkerLeaving(pid, "max_requests",
                                                                  sim.now))))
        sim.tick()
        assert len(sim.sup.workers) + len(sim.sup.pending) <= 4  # count + count leaving
    assert spawned == 2  # the leaving ones hold the room until they exit
    for pid in sim.pids(WorkerState.STOPPING):
        sim.exit(pid, exited(10))
    assert len(sim.sup.current()) + len(sim.sup.pending) == 2  # the pool is whole again


def test_a_leave_from_a_worker_already_stopping_changes_nothing() -> None:
    sim = Sim(count=1)
    (pid,) = sim.running()
    sim.command("scale", value="2")
    sim.command("stop")
    assert not sim.feed(sv.WorkerLeaving(pid, "max_requests", sim.now))


def test_a_replacement_takes_the_id_of_the_worker_it_replaces_whatever_the_reason() -> None:
    sim = Sim(count=3, timeout=5)
    first, second, third = sim.running()
    assert [sim.sup.workers[p].id for p in (first, second, third)] == [1, 2, 3]
    out = sim.feed(sv.WorkerLeaving(second, "max_memory", sim.now))  # recycled
    assert [(s.worker_id, s.slot) for s in of(sv.Spawn, out)] == [(2, 3)]  # slot 1 is busy
    sim.ready()
    hung = sv.SlotView(busy=True, busy_since=sim.now, requests=1, what="GET /hang")
    out = sim.tick(after=6, slots={third: hung})  # timed out: killed, replaced
    assert [s.worker_id for s in of(sv.Spawn, out)] == [3]
    sim.ready()
    out = sim.exit(first, killed(signal.SIGSEGV))  # crashed
    assert [s.worker_id for s in of(sv.Spawn, out)] == [1]
    sim.ready()
    assert sorted(w.id for w in sim.sup.current()) == [1, 2, 3]


# -- heartbeats ------------------------------------------------------------------------------


def beat(at: float, requests: int = 1) -> sv.SlotView:
    return sv.SlotView(busy=False, requests=requests, heartbeat=at)


def test_an_idle_worker_that_misses_its_heartbeat_is_stuck_and_replaced() -> None:
    sim = Sim(count=2, timeout=5)
    first, second = sim.running()
    for _i in range(24):  # 6 s: the second one beats, the first one is silent
        out = sim.tick(slots={first: beat(1.0), second: beat(sim.now)})
        if of(sv.MarkStuck, out):
            break
    assert signals(out, signal.SIGKILL) == [first]
    assert of(sv.MarkStuck, out) == [sv.MarkStuck(0)]
    assert [s.worker_id for s in of(sv.Spawn, out)] == [1]
    assert logged(out, "missed its heartbeat") and sim.sup.totals["stuck"] == 1
    assert sim.sup.workers[first].state is WorkerState.STUCK
    assert 5.0 < sim.now - 100.0 <= 6.0
    out = sim.exit(first, killed(signal.SIGKILL))
    assert sim.sup.totals["crashes"] == 0 and not of(sv.Spawn, out)
    sim.command("stop")  # stuck -> stopping is legal


def test_a_master_that_was_stopped_does_not_blame_its_idle_workers() -> None:
    sim = Sim(count=1, timeout=5)
    (pid,) = sim.running()
    sim.tick(slots={pid: beat(sim.now)})
    out = sim.tick(after=16, slots={pid: beat(sim.now - 0.5)})  # its beats went on
    assert not of(sv.Signal, out) and sim.sup.totals["stuck"] == 0
    busy = sv.SlotView(busy=True, busy_since=sim.now, requests=1, what="GET /")
    for _ in range(30):  # busy and silent: workers.timeout judges, not the heartbeat
        sim.tick(slots={pid: sv.SlotView(busy=True, busy_since=busy.busy_since, requests=1,
                                         heartbeat=1.0)})
    assert sim.sup.totals["stuck"] == 0


# -- the tables ------------------------------------------------------------------------------


def test_illegal_moves_raise_in_strict_mode() -> None:
    sim = Sim(count=1)
    (pid,) = sim.running()
    w = sim.sup.workers[pid]
    sim.command("stop")
    with pytest.raises(sv.IllegalTransition, match="stopping -> idle"):
        sim.sup._set_state(w, WorkerState.IDLE, "test")
    with pytest.raises(sv.IllegalTransition, match="stopping -> running"):
        sim.sup._set_phase(sv.Phase.RUNNING, "test")


def test_illegal_moves_are_logged_as_bugs_when_not_strict() -> None:
    sup = sv.Supervisor(WorkersConfig(count=1), master_pid=1, max_slots=4)
    out = sup.handle(sv.Started(1.0))
    (spawn,) = of(sv.Spawn, out)
    sup.handle(sv.Spawned(spawn.slot, 7, 1.0))
    sup._set_state(sup.workers[7], WorkerState.BUSY, "test")  # starting -> busy: illegal
    out = sup.handle(sv.Tick(2.0))
    assert logged(out, "bug: illegal transition worker 1 (pid 7): starting -> busy")


def test_every_event_has_one_handler_and_anything_else_is_refused() -> None:
    assert set(typing.get_args(sv.Event)) == set(sv.HANDLERS)
    sup = sv.Supervisor(WorkersConfig(count=1), master_pid=1, max_slots=4, strict=True)
    with pytest.raises(TypeError, match="not a supervisor event"):
        sup.handle(sv.Spawn(0, 1))  # type: ignore[arg-type]  # an action is no event


# -- what the shell tells the supervisor instead of writing its state -------------------------


def test_a_resumed_image_adopts_workers_totals_and_waiters_in_reloading() -> None:
    cfg = WorkersConfig(count=2)
    sup = sv.Supervisor(cfg, master_pid=1, max_slots=16, strict=True)
    adopted = (sv.AdoptedWorker(0, 501, 3, 10.0, True, 1),
               sv.AdoptedWorker(1, 502, 3, 11.0, False, 2),
               sv.AdoptedWorker(2, 503, 3, 12.0, True, 3, stop_reason="max_requests",
                                kill_at=40.0))
    sup.handle(sv.Resumed(adopted, 3, ("cli",), 20.0, totals={"crashes": 4, "gone": 9},
                          max_queue=7))
    assert sup.phase is sv.Phase.RELOADING and sup.generation == 4
    assert [sup.workers[pid].state for pid in (501, 502, 503)] == [
        WorkerState.IDLE, WorkerState.STARTING, WorkerState.STOPPING]
    assert sup.workers[503].stop_reason == "max_requests" and sup.workers[503].kill_at == 40.0
    assert sup.totals["crashes"] == 4 and "gone" not in sup.totals and sup.max_queue == 7
    assert sup.reload is not None and sup.reload.waiters == ["cli"]
    out = sup.handle(sv.Started(20.0))
    assert [(s.slot, s.generation) for s in of(sv.Spawn, out)] == [(3, 4), (4, 4)]


def test_resuming_after_the_start_is_a_bug() -> None:
    sim = Sim(count=1)
    sim.running()
    with pytest.raises(sv.IllegalTransition, match="resumed after the start"):
        sim.feed(sv.Resumed((), 1, (), sim.now))


def test_a_pidfile_that_cannot_be_written_stops_the_master_with_exit_1() -> None:
    sim = Sim(count=2)
    pids = sim.running()
    out = sim.feed(sv.PidfileFailed("cannot write the pidfile /run/x.pid: Permission denied",
                                    sim.now))
    assert logged(out, "cannot write the pidfile /run/x.pid: Permission denied: stopping")
    assert sim.sup.phase is sv.Phase.STOPPING and signals(out, signal.SIGINT) == pids
    sim.exit(pids[0])
    assert of(sv.Exit, sim.exit(pids[1])) == [sv.Exit(1)]
