"""Stop requests: SIGTERM (preemption) and SIGINT (Ctrl-C) while a run starts or trains.

    stopping.install()                        # the trainer, first thing: no signal is lost at start-up
    with stopping.requests(resume_point) as stop:
      ... if stop.signal: finish the call, agree on the step, checkpoint, exit 0

(A third signal, SIGUSR1, is dcgan_jax.launch's word that another process of the run died: the
process ends at once with one line naming where the run resumes, exit 3.)

The first signal asks the run to stop: the loop finishes its call, every process agrees on the step, a
checkpoint is written and the run exits 0. A second signal ends the process at once, still cleanly: one
line, `error: second SIGINT: ended at once ...; run the same command again to resume from step N (the
newest checkpoint)`, exit status 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), no
traceback. Nothing is lost by it: checkpoints are renamed into place only when complete, and the
metrics a kill cuts short are repaired by the restart (docs/training.md, "Stops and faults").

Signals are counted by a watcher thread woken through `signal.set_wakeup_fd`, not by the Python handler:
Python runs handlers only between bytecodes of the main thread, so during a long compilation or a
blocking device call a second Ctrl-C would otherwise wait for it to end; and no handler ever raises, so
no KeyboardInterrupt can be swallowed inside a library callback (JAX's garbage-collection hook, say).
"""

import contextlib
import signal
import socket
import sys
import threading
from typing import Callable, Optional

from dcgan_jax import cli

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# From dcgan_jax.launch to the other processes of a run when one of them died: a survivor may sit in a
# collective with the dead process for ever, so it ends at once with the lost-process line.
LOST_A_PROCESS = signal.SIGUSR1


class _Requests:
  """The process's stop requests: `signal` is the first one received (None: none yet)."""

  def __init__(self):
    self.signal: Optional[signal.Signals] = None
    self.resume_point: Callable[[], str] = lambda: "the newest checkpoint"
    self.process = ""  # "process i of n" in a multi-process run
    self.ending = False  # the process has said its last line: signals add none
    self._old, self._socket = {}, None

  def install(self) -> bool:
    """Takes SIGTERM and SIGINT for this process (main thread only). False when it cannot (another
    thread) or already had them; then it takes them again from any library that took them meanwhile
    (JAX's preemption service would, in jax.distributed.initialize: parallel.initialize turns it off)."""
    if threading.current_thread() is not threading.main_thread():
      return False
    if self._old:
      for sig in self._old:
        signal.signal(sig, lambda signum, frame: None)
      return False
    receive, send = socket.socketpair()
    receive.setblocking(True)
    send.setblocking(False)
    self._old_wakeup_fd = signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
    self._socket = (receive, send)
    for sig in SIGNALS + (LOST_A_PROCESS,):
      self._old[sig] = signal.signal(sig, lambda signum, frame: None)  # counted by the watcher
    threading.Thread(target=self._watch, args=(receive,), name="dcgan_jax_signals", daemon=True).start()
    return True

  def uninstall(self) -> None:
    if not self._old:
      return
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
    signal.set_wakeup_fd(self._old_wakeup_fd)  # whoever had it before (an asyncio loop, say)
    self._old = {}
    receive, send = self._socket
    with contextlib.suppress(OSError):
      receive.shutdown(socket.SHUT_RDWR)  # wakes the watcher, which then ends
    receive.close()
    send.close()
    self._socket, self.signal = None, None

  def _watch(self, receive) -> None:
    while True:
      try:
        received = receive.recv(64)
      except OSError:
        return
      if not received:
        return
      for number in received:
        if number in [int(s) for s in SIGNALS + (LOST_A_PROCESS,)]:
          self._received(signal.Signals(number))

  def _received(self, sig: signal.Signals) -> None:
    if self.ending:
      return
    if sig == LOST_A_PROCESS:
      self.end_now(f"{self.process}: lost another process of the run (its launcher saw it end); start "
                   f"all processes again to resume from {self._where()}", 3)
    if self.signal is None:
      self.signal = sig
      print(f"{sig.name}: stopping after the current step with a checkpoint (send it again to end at "
            "once)", file=sys.stderr, flush=True)
      return
    self.end_now(f"second {sig.name}: ended at once, without a checkpoint of this step; run the same "
                 f"command again to resume from {self._where()}", 128 + int(sig))

  def _where(self) -> str:
    try:
      return self.resume_point()
    except Exception:  # pylint: disable=broad-except
      return "the newest checkpoint"

  end_now = staticmethod(cli.end_now)


_REQUESTS = _Requests()


def install(resume_point: Optional[Callable[[], str]] = None, process: Optional[str] = None) -> None:
  """Takes SIGTERM, SIGINT (and the launcher's LOST_A_PROCESS) for the rest of the process.
  resume_point() names where a restart resumes, for the lines that end the process at once (e.g. "step
  400 (the newest checkpoint)"); process: "process i of n" in a multi-process run."""
  _REQUESTS.install()
  if resume_point:
    _REQUESTS.resume_point = resume_point
  if process:
    _REQUESTS.process = process



def ending() -> None:
  """The process is ending with a line already decided (cli.end_run): from now on a signal, the
  launcher's lost-process word included, adds no line of its own and does not end it first."""
  _REQUESTS.ending = True


@contextlib.contextmanager
def requests(resume_point: Optional[Callable[[], str]] = None):
  """The stop requests while the block runs; installed for the block alone when the process has not
  installed them (a library caller). Outside the main thread no signal reaches the block."""
  installed_here = _REQUESTS.install()
  old_point = _REQUESTS.resume_point
  if resume_point:
    _REQUESTS.resume_point = resume_point
  try:
    yield _REQUESTS
  finally:
    _REQUESTS.resume_point = old_point
    if installed_here:
      _REQUESTS.uninstall()
