"""The supervisor: owns the listening sockets, forks workers, keeps the slots filled.

Like gunicorn's arbiter it is one small synchronous loop (no event loop that
workers would inherit, no threads): signal handlers only queue the signal;
the loop wakes on the signal pipe or a worker's heartbeat pipe, handles one
signal at a time through ``handle_<name>``, reaps children, kills stuck
ones, advances a rolling replacement if one is under way, and refills empty
slots.

It owns one SO_REUSEPORT socket per slot and listen address, for the life of
the slot; a worker that replaces another in the same slot inherits it, so
connections waiting in the accept queue are never reset. It imports no
plugin code: workers load plugins after fork, so an upgraded plugin runs
after a reload.

Signals: HUP reload, TERM/INT graceful stop, QUIT immediate stop, TTIN/TTOU
one worker more/fewer, USR1 reopen log files (forwarded to workers).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import queue
import random
import select
import signal
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

from . import config, runtime, systemd
from .config.model import GatewaySettings
from .config.schema import ConfigErrors
from .heartbeat import EXIT_BOOT_FAILED, SupervisorChannel
from .metrics import SupervisorMetrics
from .slots import (
    Rollout, Slot, WorkerProcess, crash_delay, crashes_after_death, exit_reason, is_stuck, requests_limit,
)
from .sockets import bind_listener
from .tls import CertificateError, listener_contexts

log = logging.getLogger("plugway.supervisor")
SIGNALS = {
    signal.SIGHUP: "hup", signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit",
    signal.SIGTTIN: "ttin", signal.SIGTTOU: "ttou", signal.SIGUSR1: "usr1", signal.SIGCHLD: "chld",
}
STOP_MARGIN_SECONDS = 5.0
STORE_START_SECONDS = 5.0
QUIT_WAIT_SECONDS = 5.0
PR_SET_PDEATHSIG = 1  # prctl(2)


class HaltServer(BaseException):
    """Stop the supervisor with an exit status (BaseException, so no plugin code can swallow it)."""

    def __init__(self, reason: str, status: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Supervisor:
    def __init__(self, config_path: str, settings: GatewaySettings, runtime_dir: Path) -> None:
        self.config_path = config_path
        self.settings = settings
        self.config_hash = _file_hash(config_path)
        self.pid = os.getpid()
        self.generation = 1
        self.runtime = runtime_dir
        self.slots: list[Slot] = []
        self.workers: dict[int, WorkerProcess] = {}
        self.admin_socket: socket.socket | None = None
        self.store_pid: int | None = None
        self._tls: dict[int, tuple[GatewaySettings, dict[str, Any]]] = {}  # see tls_contexts()
        self.rollout: Rollout | None = None
        self.recycle_queue: deque[int] = deque()
        self.reload_pending = False
        self.booted = False
        self.stopping: str | None = None
        self.stop_deadline = 0.0
        self.started_at = time.time()
        self.last_reload: dict[str, Any] | None = None
        self.reloads = {"success": 0, "failure": 0}
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._wakeup_read, self._wakeup_write = os.pipe()
        self._status_dirty = True
        self._last_report = 0.0
        self._next_watchdog = 0.0
        self._watchdog = systemd.watchdog_interval()
        self.metrics = SupervisorMetrics()

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.start()
            tick = min(1.0, self._watchdog or 1.0)
            while True:
                self.wait_for_events(tick)
                self.handle_signals()
                self.reap_workers()
                if self.stopping is not None:
                    if self.stopped():
                        return 0
                    continue
                self.murder_stuck_workers()
                self.advance_rollout()
                self.manage_slots()
                self.report()
        except HaltServer as halt:
            log.error("stopping: %s", halt.reason)
            self.stopping = "halt"  # the workers' exits are now expected, not a new failure
            systemd.notify("STOPPING=1", f"STATUS=failed: {halt.reason}")
            self.kill_all(signal.SIGKILL)
            self.stop_store()
            return halt.status
        finally:
            self.close()

    def start(self) -> None:
        self.metrics.generation.set(self.generation)
        for signum in SIGNALS:
            signal.signal(signum, self._queue_signal)
        os.set_blocking(self._wakeup_read, False)
        os.set_blocking(self._wakeup_write, False)
        signal.set_wakeup_fd(self._wakeup_write, warn_on_full_buffer=False)
        try:
            self.tls_contexts(self.settings)
        except (CertificateError, OSError) as exc:
            raise HaltServer(f"cannot load a TLS certificate: {exc}", status=1) from None
        try:
            if self.settings.admin.listen:
                self.admin_socket = bind_listener(self.settings.admin.listen, backlog=128, reuse_port=False)
            self.start_store()
            for index in range(_worker_count(self.settings)):
                self.add_slot(index)
        except OSError as exc:
            raise HaltServer(f"cannot listen: {exc.strerror or exc} ({exc.filename or 'a configured address'})",
                             status=1) from None
        log.info("supervisor %d started %d workers", os.getpid(), len(self.slots))

    def _queue_signal(self, signum: int, frame: Any) -> None:
        """NO LOGGING here: only queue the signal (the loop handles it)."""
        self._signals.put_nowait(signum)

    def wait_for_events(self, timeout: float) -> None:
        fds = [self._wakeup_read] + [worker.channel.fd for worker in self.workers.values()]
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        for fd in readable:
            if fd == self._wakeup_read:
                _drain_pipe(fd)
        for worker in list(self.workers.values()):
            if worker.channel.fd in readable:
                self.read_messages(worker)

    def handle_signals(self) -> None:
        while True:
            try:
                signum = self._signals.get_nowait()
            except queue.Empty:
                return
            name = SIGNALS.get(signum)
            if name != "chld":
                log.info("received SIG%s", name.upper())
            getattr(self, f"handle_{name}")()

    # --- signal handlers ------------------------------------------------------------------------

    def handle_hup(self) -> None:
        if self.stopping is not None:
            return
        if self.rollout is not None or not self.booted:
            self.reload_pending = True
            return
        self.reload()

    def handle_term(self) -> None:
        self.stop("graceful", signal.SIGTERM, self.settings.server.graceful_timeout + STOP_MARGIN_SECONDS)

    handle_int = handle_term

    def handle_quit(self) -> None:
        self.stop("immediate", signal.SIGQUIT, QUIT_WAIT_SECONDS)

    def handle_ttin(self) -> None:
        self.add_slot(len(self.slots))

    def handle_ttou(self) -> None:
        live = [slot for slot in self.slots if not slot.retiring]
        if len(live) > 1:
            self.retire_slot(live[-1])

    def handle_usr1(self) -> None:
        for worker in self.workers.values():
            _kill(worker.pid, signal.SIGUSR1)

    def handle_chld(self) -> None:
        """Children are reaped by the loop right after the signals."""

    # --- workers --------------------------------------------------------------------------------

    def spawn(self, slot: Slot, settings: GatewaySettings, generation: int) -> WorkerProcess:
        tls = self.tls_contexts(settings)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker; it never returns from here
            os.close(read_fd)
            self._become_worker(slot, settings, tls, write_fd)
        os.close(write_fd)
        now = time.monotonic()
        worker = WorkerProcess(pid, slot.index, generation, SupervisorChannel(read_fd), now, last_beat=now)
        self.workers[pid] = worker
        self._status_dirty = True
        log.info("started worker %d in slot %d (generation %d)", pid, slot.index, generation,
                 extra={"pid": pid, "slot": slot.index})
        return worker

    def _become_worker(self, slot: Slot, settings: GatewaySettings, tls: dict[str, Any], channel_fd: int) -> None:
        status = EXIT_BOOT_FAILED
        try:
            self._leave_supervisor(keep=slot)
            listeners = [(slot.sockets[listener.address], listener) for listener in settings.server.listeners]
            from .worker import run_worker_process
            limit = requests_limit(settings.server.max_requests, settings.server.max_requests_jitter, random.random())
            status = run_worker_process(
                settings, listeners, self.admin_socket, channel_fd, limit, self.status_file, str(self.store_path),
                runs_health_checks=slot.index == 0, tls_contexts=tls,
            )
        except BaseException:
            log.exception("worker failed")
        finally:
            os._exit(status)

    def tls_contexts(self, settings: GatewaySettings) -> dict[str, Any]:
        """The TLS contexts of a configuration's listeners, built once, before its workers are
        forked: every worker of a generation then shares the session ticket keys, so a client
        resumes its TLS session whichever worker the kernel hands its next connection to. A
        reload builds new ones from the files (certificate renewal)."""
        entry = self._tls.get(id(settings))
        if entry is None or entry[0] is not settings:
            entry = (settings, listener_contexts(settings.server.listeners))
            keep = {id(self.settings), id(self.rollout.settings) if self.rollout else None}
            self._tls = {key: value for key, value in self._tls.items() if key in keep}
            self._tls[id(settings)] = entry
        return entry[1]

    def _leave_supervisor(self, keep: Slot | None) -> None:
        """In a freshly forked child: die with the supervisor, default signal handling, and none of
        the supervisor's fds."""
        _die_with(self.pid)
        signal.set_wakeup_fd(-1)
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        # USR1 (logrotate) would kill a worker still starting: ignored until the worker handles it.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        for fd in [self._wakeup_read, self._wakeup_write] + [w.channel.fd for w in self.workers.values()]:
            os.close(fd)
        for other in self.slots:
            if other is not keep:
                for sock in other.sockets.values():
                    sock.close()

    # --- the host-local store -------------------------------------------------------------------

    @property
    def store_path(self) -> Path:
        return runtime.store_path(self.runtime)

    def start_store(self) -> None:
        """Fork the store process (see gateway.store.local) and wait until it listens."""
        path = self.store_path
        if path.exists():
            path.unlink()
        store = self.settings.store
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                self._leave_supervisor(keep=None)
                if self.admin_socket is not None:
                    self.admin_socket.close()
                from .store.local import run_store_process
                run_store_process(str(path), store.max_keys, store.max_bytes)
                status = 0
            except BaseException:
                log.exception("the store process failed")
            finally:
                os._exit(status)
        self.store_pid = pid
        deadline = time.monotonic() + STORE_START_SECONDS
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        if path.exists():
            log.info("store process %d listening on %s", pid, path, extra={"pid": pid})
        else:  # the workers' store calls fail (and reconnect) until it listens
            log.error("store process %d not listening on %s after %.0f s", pid, path, STORE_START_SECONDS,
                      extra={"pid": pid})

    def store_exited(self, reason: str) -> None:
        self.store_pid = None
        if self.stopping is not None:
            return
        log.error("the store process died (%s): restarting it; shared state is lost", reason)
        self.metrics.restarts.labels("store").inc()
        self.start_store()

    @property
    def status_file(self) -> Path:
        return runtime.status_path(self.runtime)

    def read_messages(self, worker: WorkerProcess) -> None:
        messages, _ = worker.channel.receive()
        now = time.monotonic()
        for message in messages:
            kind = message.get("t")
            worker.last_beat = now
            if kind == "ready" and worker.state == "starting":
                worker.state, worker.ready_at = "ready", now
                self._status_dirty = True
            elif kind == "beat":
                worker.requests, worker.rss = message.get("requests", 0), message.get("rss", 0)
            elif kind == "failed":
                worker.failure = message.get("message", "start-up failed")
            elif kind == "closed":
                worker.accepting = False
            elif kind == "recycle" and worker.state == "ready":
                self.request_recycle(worker, message.get("reason", "recycle"))

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.store_pid:
                self.store_exited(exit_reason(status))
                continue
            worker = self.workers.pop(pid, None)
            if worker is not None:
                worker.exit_reason = exit_reason(status)
                self.worker_exited(worker)

    def worker_exited(self, worker: WorkerProcess) -> None:
        worker.channel.receive()
        worker.channel.close()
        self._status_dirty = True
        self.metrics.worker_dead(worker.pid)
        slot = self.slot(worker.slot)
        if worker.state == "draining" or self.stopping is not None:
            log.info("worker %d (slot %d) stopped: %s", worker.pid, worker.slot, worker.exit_reason,
                     extra={"pid": worker.pid, "slot": worker.slot})
            if slot is not None and slot.retiring and slot.worker is None:
                self.remove_slot(slot)
            return
        if self.rollout is not None and worker is self.rollout.replacement:
            return  # advance_rollout() sees it failed
        if not self.booted:
            raise HaltServer(f"a worker failed to start: {worker.failure or worker.exit_reason}")
        if slot is not None and slot.worker is worker:
            now = time.monotonic()
            slot.worker = None
            slot.crashes = crashes_after_death(slot.crashes, worker, now)
            slot.respawn_at = now + crash_delay(slot.crashes)
            reason = "stuck" if worker.failure == "stuck" else "crash"
            self.metrics.restarts.labels(reason).inc()
            log.error("worker %d (slot %d) died: %s; %s", worker.pid, worker.slot, worker.failure or worker.exit_reason,
                      f"restarting in {slot.respawn_at - now:.1f}s" if slot.respawn_at > now else "restarting now",
                      extra={"pid": worker.pid, "slot": worker.slot})

    def murder_stuck_workers(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if worker.state == "starting" and now - worker.started > self.settings.server.ready_timeout:
                self.never_ready(worker)
            elif is_stuck(worker, now, self.settings.server.worker_timeout):
                log.error("worker %d (slot %d) sent no heartbeat for %.1fs: killing it", worker.pid, worker.slot,
                          now - worker.last_beat, extra={"pid": worker.pid, "slot": worker.slot})
                worker.failure = "stuck"
                worker.last_beat = now
                _kill(worker.pid, signal.SIGKILL)
            elif worker.stop_deadline is not None and now > worker.stop_deadline:
                log.warning("worker %d did not finish draining in time: killing it", worker.pid)
                worker.stop_deadline = None
                _kill(worker.pid, signal.SIGKILL)

    def never_ready(self, worker: WorkerProcess) -> None:
        if not self.booted:
            raise HaltServer(f"worker {worker.pid} did not report ready within {self.settings.server.ready_timeout}")
        if self.rollout is not None and worker is self.rollout.replacement:
            return  # the rollout's own deadline handles it
        worker.failure = worker.failure or "it did not report ready in time"
        worker.started = time.monotonic()
        _kill(worker.pid, signal.SIGKILL)

    def drain(self, worker: WorkerProcess, signum: int = signal.SIGTERM, grace: float | None = None) -> None:
        worker.state = "draining"
        grace = self.settings.server.graceful_timeout + STOP_MARGIN_SECONDS if grace is None else grace
        worker.stop_deadline = time.monotonic() + grace
        self._status_dirty = True
        _kill(worker.pid, signum)

    # --- slots ----------------------------------------------------------------------------------

    def slot(self, index: int) -> Slot | None:
        return next((slot for slot in self.slots if slot.index == index), None)

    def add_slot(self, index: int) -> None:
        slot = Slot(index)
        self.bind_slot(slot, self.settings)
        self.slots.append(slot)
        slot.worker = self.spawn(slot, self.settings, self.generation)

    def bind_slot(self, slot: Slot, settings: GatewaySettings) -> None:
        for listener in settings.server.listeners:
            if listener.address not in slot.sockets:
                slot.sockets[listener.address] = bind_listener(listener.address, backlog=settings.server.backlog)

    def retire_slot(self, slot: Slot) -> None:
        """Drain the slot's worker, then close its sockets (only tcp_migrate_req=1 saves their queue)."""
        slot.retiring = True
        if slot.worker is not None:
            worker, slot.worker = slot.worker, None
            self.drain(worker)
        else:
            self.remove_slot(slot)

    def remove_slot(self, slot: Slot) -> None:
        for sock in slot.sockets.values():
            sock.close()
        self.slots.remove(slot)
        self._status_dirty = True

    def manage_slots(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            rolling = self.rollout is not None and self.rollout.current == slot.index
            if slot.worker is None and not slot.retiring and not rolling and now >= slot.respawn_at:
                slot.worker = self.spawn(slot, self.settings, self.generation)
        if not self.booted and all(slot.worker and slot.worker.state == "ready" for slot in self.slots):
            self.booted = True
            log.info("all %d workers are ready", len(self.slots))
            systemd.notify("READY=1", f"STATUS=serving with {len(self.slots)} workers, generation {self.generation}")
        if self.booted:
            self.metrics.workers.set(sum(1 for w in self.workers.values() if w.state == "ready"))

    # --- reload and recycling -------------------------------------------------------------------

    def reload(self) -> None:
        systemd.reloading()
        systemd.notify("STATUS=reloading")
        try:
            settings = config.load(self.config_path)
            self.tls_contexts(settings)
            for slot in self.slots:
                self.bind_slot(slot, settings)
            self.rebind_admin(settings)
        except CertificateError as exc:
            self.finish_reload(False, [f"cannot load a TLS certificate: {exc}"])
            return
        except (ConfigErrors, OSError) as exc:
            errors = [str(e) for e in exc.errors] if isinstance(exc, ConfigErrors) else [f"cannot listen: {exc}"]
            self.finish_reload(False, errors)
            return
        pending = deque(slot.index for slot in self.slots if not slot.retiring)
        self.rollout = Rollout("reload", settings, self.generation + 1, pending)
        log.info("reloading: generation %d, %d workers to replace", self.generation + 1, len(pending))

    def rebind_admin(self, settings: GatewaySettings) -> None:
        if settings.admin.listen == self.settings.admin.listen:
            return
        new = bind_listener(settings.admin.listen, backlog=128, reuse_port=False) if settings.admin.listen else None
        if self.admin_socket is not None:
            self.admin_socket.close()
        self.admin_socket = new

    def request_recycle(self, worker: WorkerProcess, reason: str) -> None:
        slot = self.slot(worker.slot)
        if slot is None or slot.worker is not worker or worker.slot in self.recycle_queue:
            return
        log.info("recycling worker %d (slot %d): %s", worker.pid, worker.slot, reason,
                 extra={"pid": worker.pid, "slot": worker.slot})
        self.metrics.restarts.labels(reason).inc()
        self.recycle_queue.append(worker.slot)

    def advance_rollout(self) -> None:
        if not self.booted:
            return
        if self.rollout is None:
            if self.reload_pending:
                self.reload_pending = False
                self.reload()
            elif self.recycle_queue:
                self.rollout = Rollout("recycle", self.settings, self.generation, deque([self.recycle_queue.popleft()]))
            return
        rollout = self.rollout
        now = time.monotonic()
        if rollout.current is None:
            self.start_next_replacement(rollout, now)
            return
        replacement = rollout.replacement
        if replacement.state == "ready":
            self.switch_slot(rollout)
            self.start_next_replacement(rollout, now)  # at once: no waiting for the next wake-up
        elif replacement.pid not in self.workers or now > rollout.deadline:
            reason = replacement.failure or replacement.exit_reason or "it did not report ready in time"
            _kill(replacement.pid, signal.SIGKILL)
            self.rollout_failed(rollout, f"the new worker for slot {rollout.current} failed: {reason}")

    def start_next_replacement(self, rollout: Rollout, now: float) -> None:
        while rollout.pending and self.slot(rollout.pending[0]) is None:
            rollout.pending.popleft()
        if not rollout.pending:
            # Done once no replaced worker accepts any more, so that every connection made after
            # the reload is reported goes to the new configuration.
            if not any(old.accepting and old.pid in self.workers for old in rollout.replaced):
                self.rollout_finished(rollout)
            return
        slot = self.slot(rollout.pending.popleft())
        rollout.current = slot.index
        rollout.replacement = self.spawn(slot, rollout.settings, rollout.generation)
        rollout.deadline = now + rollout.settings.server.ready_timeout

    def switch_slot(self, rollout: Rollout) -> None:
        slot = self.slot(rollout.current)
        old, slot.worker = slot.worker, rollout.replacement
        if old is not None and old.pid in self.workers:
            self.drain(old)
            rollout.replaced.append(old)
        rollout.done.append(slot.index)
        rollout.current, rollout.replacement = None, None

    def rollout_finished(self, rollout: Rollout) -> None:
        self.rollout = None
        if rollout.reason == "reload":
            self.settings, self.generation = rollout.settings, rollout.generation
            self.config_hash = _file_hash(self.config_path)
            self.metrics.generation.set(self.generation)
            self.resize(_worker_count(rollout.settings))
            self.prune_sockets()
            self.finish_reload(True, [])

    def rollout_failed(self, rollout: Rollout, reason: str) -> None:
        self.rollout = None
        if rollout.reason == "recycle":
            log.error("recycling failed, the old worker keeps serving: %s", reason)
            return
        if rollout.done:
            # Some slots already run the new configuration: put them back on the old one.
            self.rollout = Rollout("rollback", self.settings, self.generation, deque(rollout.done))
        if rollout.reason == "reload":
            self.finish_reload(False, [reason])

    def finish_reload(self, success: bool, errors: list[str]) -> None:
        result = "success" if success else "failure"
        self.reloads[result] += 1
        self.metrics.reloads.labels(result).inc()
        self.last_reload = {"result": result, "errors": errors, "generation": self.generation, "at": time.time(),
                            "number": sum(self.reloads.values())}
        self._status_dirty = True
        if success:
            log.info("reload complete: generation %d", self.generation)
            systemd.notify("READY=1", f"STATUS=serving with {len(self.slots)} workers, generation {self.generation}")
        else:
            log.error("reload failed, still serving generation %d: %s", self.generation, "; ".join(errors),
                      extra={"errors": errors})
            systemd.notify("READY=1", f"STATUS=reload failed, serving generation {self.generation}: {errors[0]}")

    def resize(self, count: int) -> None:
        live = [slot for slot in self.slots if not slot.retiring]
        for index in range(len(live), count):
            self.add_slot(max(slot.index for slot in self.slots) + 1)
        for slot in live[count:]:
            self.retire_slot(slot)

    def prune_sockets(self) -> None:
        wanted = {listener.address for listener in self.settings.server.listeners}
        for slot in self.slots:
            for address in [a for a in slot.sockets if a not in wanted]:
                slot.sockets.pop(address).close()

    # --- stopping -------------------------------------------------------------------------------

    def stop(self, mode: str, signum: int, grace: float) -> None:
        if self.stopping is not None:
            return
        self.stopping = mode
        self.stop_deadline = time.monotonic() + grace
        systemd.notify("STOPPING=1", f"STATUS=stopping ({mode})")
        for worker in list(self.workers.values()):
            self.drain(worker, signum, grace)

    def stopped(self) -> bool:
        if not self.workers:
            log.info("all workers stopped")
            self.stop_store()
            return True
        if time.monotonic() > self.stop_deadline:
            log.warning("%d workers still running at the deadline: killing them", len(self.workers))
            self.kill_all(signal.SIGKILL)
            self.stop_store()
            return True
        return False

    def stop_store(self) -> None:
        if self.store_pid is None:
            return
        _kill(self.store_pid, signal.SIGTERM)
        try:
            os.waitpid(self.store_pid, 0)
        except ChildProcessError:
            pass
        self.store_pid = None

    def kill_all(self, signum: int) -> None:
        for pid in list(self.workers):
            _kill(pid, signum)
        deadline = time.monotonic() + QUIT_WAIT_SECONDS
        while self.workers and time.monotonic() < deadline:
            self.reap_workers()
            time.sleep(0.01)

    def close(self) -> None:
        for slot in self.slots:
            for sock in slot.sockets.values():
                sock.close()
        if self.admin_socket is not None:
            self.admin_socket.close()
        runtime.release(self.runtime)
        for fd in (self._wakeup_read, self._wakeup_write):
            os.close(fd)

    # --- reporting ------------------------------------------------------------------------------

    def report(self) -> None:
        now = time.monotonic()
        if self._watchdog is not None and now >= self._next_watchdog:
            systemd.notify("WATCHDOG=1")
            self._next_watchdog = now + self._watchdog
        if self._status_dirty or now - self._last_report >= 1.0:
            self._last_report = now
            self._status_dirty = False
            runtime.write_status(self.runtime, self.status(now))

    def status(self, now: float) -> dict[str, Any]:
        return {
            "supervisor_pid": os.getpid(),
            "store_pid": self.store_pid,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "generation": self.generation,
            "config_path": self.config_path,
            "config_sha256": self.config_hash,
            "state": "stopping" if self.stopping else "reloading" if self.rollout else "serving",
            "ready": self.booted,
            "reloads": dict(self.reloads),
            "last_reload": self.last_reload,
            "workers": sorted((w.status(now) for w in self.workers.values()), key=lambda w: (w["slot"], w["pid"])),
        }


def _worker_count(settings: GatewaySettings) -> int:
    workers = settings.server.workers
    return os.cpu_count() or 1 if workers == "auto" else workers


def _file_hash(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


def _die_with(parent: int) -> None:
    """Ask the kernel to SIGTERM this child when the supervisor dies (even by SIGKILL), so no
    orphaned worker or store process keeps the port or the runtime directory."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before the request was in place
        os._exit(1)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
