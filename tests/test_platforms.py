"""The platform policy: every per-platform choice made in platforms.py, from the platform a program is
compiled for."""
import os
import re

from dcgan_jax import platforms

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dcgan_jax")


def test_each_choice_follows_the_platform_it_is_made_for():
  """XLA:CPU gets its own forms (CPU convolutions, lazy R1 weighted by 0, dispatched steps, rolled
  loops), GPU and TPU the accelerators' (lax convolutions, lax.cond, one scan, written-out loops), and
  --invariant_groups the exact form everywhere. Catches a choice inverted for one platform, and an
  exact form that depends on the platform."""
  cpu, gpu, tpu = (platforms.Policy(p) for p in ("cpu", "gpu", "tpu"))
  assert (cpu.conv_form(), gpu.conv_form(), tpu.conv_form()) == ("cpu", "lax", "lax")
  assert {p.conv_form(exact=True) for p in (cpu, gpu, tpu)} == {"exact"}
  for policy, accelerator in ((cpu, False), (gpu, True), (tpu, True)):
    assert (policy.branches_skip_work, policy.scan_steps, policy.unroll_loops) == (accelerator,) * 3
  assert platforms.HOST == cpu
  assert cpu.members_form("auto") == "dispatch" and gpu.members_form("vmap") == "vmap"


def test_only_the_policy_module_asks_jax_for_its_default_backend():
  """No module but platforms.py reads jax.default_backend(): a choice made from the default backend
  is wrong for programs compiled for another platform (the host reader's CPU data order on a GPU host,
  programs.py's GPU/TPU programs exported on a CPU machine). Catches a module that asks the backend
  itself."""
  modules = [os.path.join(d, n) for d, _, names in os.walk(PACKAGE) for n in names if n.endswith(".py")]
  assert len(modules) > 40  # (the subpackages' modules too)
  askers = [m for m in sorted(modules) if os.path.basename(m) != "platforms.py"
            and re.search(r"\bdefault_backend\b", open(m).read())]
  assert askers == []
