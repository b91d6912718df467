"""The reload: the RELOADING phase's own small machine (see ``supervisor.py`` for where it
sits among the phases).

A reload checks the new code and config in a throwaway process, then starts the new
generation (in a re-executed master that resumes the reload, or in place for an app
object), and retires the old generation once all of the new one is ready. It ends in one
of three ways -- done, refused (the check failed or took too long), failed (the new
workers did not start) -- and every client that asked for it gets the one answer.
"""

from __future__ import annotations

import logging
import signal
from typing import Any, Iterable

from .supervisor_actions import CancelValidation, NotifySystemd, ReExec, Reply, Validate
from .supervisor_book import READY_TIMEOUT, Book, Phase, Reload


class Reloads:
    """Starts, advances and ends the reload in progress (``Book.reload``, which only this
    class writes). Its steps, waiters, deadline and three endings are a machine of their
    own inside RELOADING; apart from the rest, each event a reload waits for is one call
    here, and the other parts only ask whether a new generation is coming up."""

    def __init__(self, book: Book, *, in_place: bool) -> None:
        self.book = book
        self.in_place = in_place  # an app object: reload forks, no re-exec

    # -- beginning -------------------------------------------------------------------------

    def start(self, client: Any, now: float) -> None:
        """A reload asked for by ``client`` (None for a signal)."""
        book = self.book
        if book.phase in (Phase.STOPPING, Phase.DRAINING):
            book.emit(Reply(client, False, error="cannot reload: the master is stopping"))
            return
        if book.phase is Phase.STARTING:
            book.emit(Reply(client, False, error="cannot reload: the master is still "
                                                 "starting; try again when it is ready"))
            return
        if book.reload is not None:
            if client is not None:
                book.reload.waiters.append(client)  # one reload answers everyone
            return
        book.log(logging.INFO, "reload: checking the new configuration and code")
        book.emit(NotifySystemd("RELOADING=1"))
        reload = book.reload = Reload(deadline=now + READY_TIMEOUT,
                                      waiters=[client] if client is not None else [])
        book.set_phase(Phase.RELOADING, "reload")
        if self.in_place:
            self._reload_in_place(now)
            return
        reload.validating = True
        book.emit(Validate())

    def resume(self, old_generation: int, waiters: Iterable[Any], now: float) -> None:
        """This master is the image the reload re-executed: its generation is the next one,
        and the reload goes on until that generation is ready."""
        self.book.generation = old_generation + 1
        self.book.reload = Reload(deadline=now + READY_TIMEOUT, waiters=list(waiters),
                                  old_generation=old_generation)
        self.book.set_phase(Phase.RELOADING, "resuming the reload after the re-exec")

    def _reload_in_place(self, now: float) -> None:
        """An app object (Python API): new workers from the same code, nothing to import."""
        book = self.book
        assert book.reload is not None
        book.reload.old_generation = book.generation
        book.generation += 1
        book.spawn_missing(now)
        if book.all_ready():
            self.generation_ready(now)

    # -- the check's verdict ---------------------------------------------------------------

    def validation_done(self, ok: bool, text: str) -> None:
        reload = self.book.reload
        if reload is None or not reload.validating:
            return
        reload.validating = False
        if not ok:
            self._refuse(text)
            return
        self.book.emit(ReExec())

    def re_exec_failed(self, error: str) -> None:
        if self.book.reload is None:
            return
        self.book.log(logging.ERROR, f"reload: cannot re-execute the master: {error}; old "
                                     "workers keep serving")
        self._end(False, f"cannot re-execute: {error}")

    def _refuse(self, text: str) -> None:
        self.book.log(logging.ERROR, f"reload refused, the old workers keep serving:\n{text}")
        self._end(False, f"reload refused, old workers keep serving:\n{text}")

    # -- the new generation ----------------------------------------------------------------

    def brings_up(self, generation: int) -> bool:
        """``generation`` is the new one a reload is starting (its failure fails the
        reload rather than being retried)."""
        reload = self.book.reload
        return reload is not None and bool(reload.old_generation) \
            and generation == self.book.generation

    def generation_ready(self, now: float) -> None:
        """All of the current generation is ready: if it is a reload's new one, the old
        generation finishes its requests and exits, and the reload is done."""
        reload, book = self.book.reload, self.book
        if reload is None or reload.validating or not reload.old_generation:
            return
        old = [w for w in book.workers.values()
               if w.generation != book.generation and w.stop_reason is None]
        book.log(logging.INFO, f"reload: generation {book.generation} is ready "
                               f"({len(book.current())} workers); {len(old)} old worker(s) "
                               "finish their requests and exit")
        for w in old:
            book.stop_worker(w, "reload", signal.SIGTERM, book.cfg.graceful_timeout, now)
        self._end(True, result={"generation": book.generation,
                                "workers": len(book.current())})

    def fail(self, why: str, now: float) -> None:
        """The new generation cannot start: it is killed and the old one serves on."""
        book = self.book
        assert book.reload is not None
        book.log(logging.ERROR, f"reload failed, the old workers keep serving: {why}")
        for w in book.current():
            book.stop_worker(w, "reload failed", signal.SIGKILL, 0, now)
        book.generation = book.reload.old_generation
        self._end(False, f"reload failed, old workers keep serving:\n{why}")

    def check_deadline(self, now: float) -> None:
        reload = self.book.reload
        if reload is None or now <= reload.deadline:
            return
        if reload.validating:
            reload.validating = False
            self.book.emit(CancelValidation())
            self._refuse(f"importing the app took longer than {READY_TIMEOUT:.0f} s")
        elif reload.old_generation:
            self.fail("the new workers did not become ready in time", now)

    # -- ending ----------------------------------------------------------------------------

    def _end(self, ok: bool, error: str = "", result: Any = None) -> None:
        book = self.book
        assert book.reload is not None
        waiters, book.reload = book.reload.waiters, None
        book.set_phase(Phase.RUNNING, "reload done" if ok else "reload failed")
        book.emit(NotifySystemd("READY=1"))
        for client in waiters:
            book.emit(Reply(client, ok, result, error))

    def end_for_stop(self) -> None:
        """The master stops: the reload in progress ends, unanswered until now."""
        reload = self.book.reload
        if reload is None:
            return
        if reload.validating:
            self.book.emit(CancelValidation())
        for client in reload.waiters:
            self.book.emit(Reply(client, False, error="the master is stopping"))
        self.book.reload = None
