"""stopping.py in this process: a signal becomes a stop request, and the process's handling is restored."""
import os
import signal
import socket
import time

from dcgan_jax import stopping


def test_a_signal_in_the_block_is_a_request_and_the_handlers_are_restored_after_it():
  """Within stopping.requests(), SIGTERM neither ends the process nor raises: it is recorded (seen by
  the watcher thread); afterwards SIGTERM's and SIGINT's handlers and the wakeup fd are what they were
  before. Catches a handler that raises (a KeyboardInterrupt swallowed in some library callback), a
  request lost, and a block that leaves its handlers or its wakeup fd installed in a library caller's
  process (an asyncio loop's own wakeup fd clobbered)."""
  before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
  theirs, ours = socket.socketpair()  # a library's wakeup fd, set before the block
  ours.setblocking(False)
  previous_fd = signal.set_wakeup_fd(ours.fileno())
  try:
    with stopping.requests(lambda: "step 7 (the newest checkpoint)") as requests:
      assert requests.signal is None
      os.kill(os.getpid(), signal.SIGTERM)
      t0 = time.time()
      while requests.signal is None and time.time() - t0 < 10:
        time.sleep(0.01)
      assert requests.signal == signal.SIGTERM
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert signal.set_wakeup_fd(previous_fd) == ours.fileno()
  finally:
    theirs.close()
    ours.close()
