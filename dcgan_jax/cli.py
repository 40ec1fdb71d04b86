"""What every command-line tool shares: flagfile lookup, the console, and the XLA:CPU setup.

    cli.run(main)                      # instead of absl.app.run(main)

Before `main` runs (after flag parsing, before JAX starts a backend):
  * XLA flags are set, here and nowhere else (convolutions.configure_xla_cpu, and configure_xla_gpu
    for --invariant_groups);
  * the console shows dcgan_jax's own INFO lines and other libraries' warnings and errors only
    (tfds, orbax, ...); `--verbosity=1` shows everything.
"""

import logging as logging_std
import os
import sys
from typing import Callable, NoReturn, Optional

from absl import app
from absl import flags
from absl import logging


# ---- How a tool ends: the library raises, only the tools (and a second signal) exit ----------------
def exit_with_error(message: str) -> NoReturn:
  """How the command-line tools end on bad input: `error: <message>` on stderr, exit status 2. (The
  library raises ConfigError; only the tools decide to exit.)"""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def end_now(message: str, status: int, wait: Callable[[], None] = lambda: None) -> NoReturn:
  """`error: <message>` on stderr and exit at once, without Python's or JAX's shutdown (which would
  wait for library threads, or for a lost process in jax.distributed's shutdown barrier). wait(): run
  between the line and the exit."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  wait()
  os._exit(status)  # pylint: disable=protected-access


def end_run(error: Exception, refusals: tuple, write_errors: tuple, resume_point: Callable[[], str],
            shared: tuple = ()) -> None:
  """How a training run ends on `error`, in one line; returns only for an error it does not handle
  (the caller re-raises it, with its traceback).

  refusals (bad settings, data that cannot be had, a diverging run): exit 2, at once in a
  multi-process run, where a normal exit would wait in jax.distributed's shutdown barrier for processes
  that may be waiting for this one in a collective (an error only this process saw).
  shared (among the refusals: errors every process raises at the same step, e.g. a divergence, read from
  metrics they share): in a multi-process run each process says its line, then they leave together
  (parallel.leave_together). A process that left first would take the coordination service (process
  0's) with it, and the launcher would end the others, before they said theirs.
  write_errors (a checkpoint that cannot be written): exit 2 at once, before orbax's writer threads add
  a traceback each while the interpreter shuts down.
  A failed collective in a multi-process run: another process died (killed, preempted, crashed); one
  line naming what failed and where the run resumes (resume_point()), exit 3 at once: JAX's own
  shutdown would wait for the lost process and abort with a stack trace."""
  import jax  # pylint: disable=g-import-not-at-top
  multi_process = jax.process_count() > 1
  if isinstance(error, refusals):
    if multi_process and isinstance(error, shared):
      from dcgan_jax import parallel, stopping  # pylint: disable=g-import-not-at-top
      stopping.ending()  # this line is the process's last: the launcher's lost-process word adds none
      end_now(str(error), 2, wait=parallel.leave_together)
    if multi_process:
      end_now(str(error), 2)
    exit_with_error(str(error))
  if isinstance(error, write_errors):
    end_now(str(error), 2)
  if multi_process and isinstance(error, jax.errors.JaxRuntimeError):
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    end_now(f"process {jax.process_index()} of {jax.process_count()}: lost another process of the run "
            f"({first[:200]}); start all processes again to resume from {resume_point()}", 3)


FLAGFILES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flagfiles")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def flagfile_names() -> list:
  return sorted(n for n in os.listdir(FLAGFILES_DIR) if n.endswith(".flags"))


def resolve_flagfiles(argv: list) -> list:
  """A --flagfile that does not exist as given is looked up among the shipped ones (dcgan_jax/flagfiles:
  mnist.flags, fashion_mnist.flags, ...), so `--flagfile=mnist.flags` works from any directory and from
  an installed package."""
  out = []
  for arg in argv:
    if arg.startswith("--flagfile="):
      path = arg.split("=", 1)[1]
      if not os.path.exists(path):
        candidate = os.path.join(FLAGFILES_DIR, os.path.basename(path))
        if not os.path.exists(candidate):
          exit_with_error(f"--flagfile={path}: file not found; pass a path, or one of the shipped "
                          f"flagfiles: {', '.join(flagfile_names())}")
        arg = f"--flagfile={candidate}"
    out.append(arg)
  return out


def parse_flags(argv: list) -> list:
  """absl's flag parsing, with shipped flagfiles found by name and bad flags as one-line errors."""
  try:
    return flags.FLAGS(resolve_flagfiles(argv))
  except flags.Error as e:
    exit_with_error(f"{e}; see --helpfull")


# Errors that orbax's writer threads (and the asyncio loops under them) log with a traceback each,
# before the same failure reaches dcgan_jax as one exception, which ends the run with one line.
_DUPLICATE_ERRORS = (os.sep + "orbax" + os.sep, os.sep + "asyncio" + os.sep)


# Other libraries' warnings about conditions dcgan_jax handles or that change nothing for its users:
# tfds's offline download retries (the run ends with one line naming the offline command), its
# decoder advice and deprecations, tensorboardX's NaN scalars (none are written).
_HANDLED_WARNINGS = ("Retrying (Retry(", "OpenCV is not installed", "is deprecated. Please change your code",
                     "NaN or Inf found in input tensor")


class _OwnLinesOnly(logging_std.Filter):
  """Lets through dcgan_jax's own log lines, and other libraries' warnings and errors (except the
  duplicates and handled conditions above)."""

  def filter(self, record):
    if record.pathname.startswith(_PACKAGE_DIR):
      return True
    if record.levelno >= logging_std.ERROR and any(p in record.pathname for p in _DUPLICATE_ERRORS):
      return record.levelno >= logging_std.CRITICAL
    if record.levelno < logging_std.ERROR and any(w in record.getMessage() for w in _HANDLED_WARNINGS):
      return False
    return record.levelno >= logging_std.WARNING


def _quiet_unraisable(unraisable) -> None:
  """Errors nobody can catch that repeat what the run already handles, and say it in one line: callbacks
  that reach a closed asyncio loop while a failed save shuts down, and the coroutines of an unreadable
  checkpoint that orbax abandons (a traceback with its TensorStore spec; the checkpoint is set aside with
  one warning). Logged at --verbosity=1; every other unraisable error goes to Python's default hook."""
  error, where = unraisable.exc_value, repr(getattr(unraisable, "object", ""))
  if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
    return
  if "coroutine" in where and (os.sep + "orbax" + os.sep in _traceback_files(error) or "tensorstore" in str(error)):
    logging.vlog(1, "Ignored in %s: %s", where, error)
    return
  sys.__unraisablehook__(unraisable)


def _traceback_files(error) -> str:
  tb, files = getattr(error, "__traceback__", None), []
  while tb is not None:
    files.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  return " ".join(files)


def configure_console() -> None:
  """Library chatter (tfds' "Load dataset info", orbax's per-save lines, ...) off the console unless
  --verbosity asks for it (absl: 0 = INFO, the default; 1 or more shows every library's INFO too)."""
  handler = logging.get_absl_handler()
  if flags.FLAGS["verbosity"].value < 1 and not any(isinstance(f, _OwnLinesOnly) for f in handler.filters):
    handler.addFilter(_OwnLinesOnly())
    sys.unraisablehook = _quiet_unraisable
  # TensorFlow's C++ INFO and WARNING lines (tf.data's, and its file system's failed look-up of cloud
  # credentials when tfds starts); errors still show.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(main: Callable, xla_cpu_convolutions: Optional[Callable[[], str]] = None,
        positional: bool = False, uses_jax: bool = True,
        deterministic: Optional[Callable[[], bool]] = None) -> None:
  """absl.app.run(main) with the shared setup above; `xla_cpu_convolutions()` may name the XLA:CPU
  convolution library (default "eigen"; the benchmark's flag); `deterministic()` asks for XLA:GPU's
  deterministic mode (--invariant_groups). positional: the tool takes positional arguments (else they
  are a one-line error). uses_jax=False: a tool that never imports JAX (study)."""

  def setup_then_main(argv):
    if uses_jax:
      from dcgan_jax.ops import convolutions  # pylint: disable=g-import-not-at-top
      convolutions.configure_xla_cpu(xla_cpu_convolutions() if xla_cpu_convolutions else "eigen")
      convolutions.configure_xla_gpu(bool(deterministic and deterministic()))
    configure_console()
    if len(argv) > 1 and not positional:
      exit_with_error(f"unexpected arguments {argv[1:]}; flags look like --name=value")
    try:
      return main(argv)
    except KeyboardInterrupt:
      # A tool that does not take SIGINT itself (the trainer does: stopping.py): one line, no traceback;
      # what it writes is renamed into place only when complete.
      print("error: interrupted (SIGINT); outputs are written whole or not at all: run the command again",
            file=sys.stderr, flush=True)
      os._exit(130)  # pylint: disable=protected-access  (no waiting for library threads)

  app.run(setup_then_main, flags_parser=parse_flags)
