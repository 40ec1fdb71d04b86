"""The data seam: the random-access path reads the in-memory path's order (same images, same steps)."""

import jax
import numpy as np
import pytest

from dcgan_jax import checkpoints
from dcgan_jax.datasets import input_pipeline
from dcgan_jax import parallel
from dcgan_jax import platforms
from dcgan_jax import step as step_lib
from dcgan_jax import train
from dcgan_jax.config import Config
from helpers import read_jsonl

pytestmark = pytest.mark.slow  # training runs: not in the fast tier


def settings(data_dir, **overrides):
  return Config(**{**dict(dataset="fashion_mnist", data_dir=data_dir, batch_size=8, latent_dim=16,
                          d_steps=2, steps_per_call=2, num_steps=4, log_every=1, sample_every=1000,
                          checkpoint_every=2), **overrides})


def test_random_access_batches_are_the_in_memory_steps_batches(tiny_data_dir, monkeypatch):
  """For several steps with --d_steps=2, the uint8 batches the host reader hands each device are those
  the in-memory step gathers on it. Catches a reader that follows another order (another key, batch
  number or position) or that hands one process's or device's examples to another."""
  from dcgan_jax.datasets import host_reader
  config = settings(tiny_data_dir).resolved()
  builder = input_pipeline.get_builder(config)
  images = input_pipeline.load_in_memory(config, (28, 28, 1), builder)
  source = input_pipeline.data_source(builder, "train")
  assert source is not None and len(source) == len(images) == 64
  positions = parallel.local_positions(2)  # 4 devices x 2
  reader = host_reader.HostReader(lambda idx: input_pipeline.read_examples(source, idx, "fashion_mnist",
                                                                           (28, 28, 1)),
                                  len(source), config, positions)
  seen = []
  to_float = step_lib.to_float

  def spy(batch):
    # ordered: the D updates' batches arrive in k's order (unordered callbacks may run concurrently)
    jax.debug.callback(lambda x: seen.append(np.asarray(x)), batch, ordered=True)
    return to_float(batch)

  monkeypatch.setattr(step_lib, "to_float", spy)
  one = jax.pmap(step_lib.make_train_step(config, 1, len(images), platforms.HOST), axis_name=parallel.AXIS,
                 in_axes=(None, 0, None), out_axes=(None, None), devices=jax.devices()[:1])
  state = step_lib.create_train_state(config, 1)
  for step in range(3):
    batch = reader.batch(step)
    assert batch.shape == (4, 2, 2, 28, 28, 1) and batch.dtype == np.uint8
    following = []
    for device in range(4):  # the in-memory step, run for this device's positions
      jax.effects_barrier()  # the previous call's callbacks have all arrived: none lands after clear()
      seen.clear()
      following.append(one(state, positions[device:device + 1], images)[0])
      jax.effects_barrier()
      assert len(seen) == 2  # one real batch per D update
      for k in range(2):
        np.testing.assert_array_equal(batch[device, k], seen[k])
    # On to the next step: the batches depend on the state's step and key only, which any of these
    # states carries (one program: positions of every call have the same shape).
    state = following[0]
  reader.close()


def test_random_access_training_equals_in_memory_training(tiny_data_dir, tmp_path):
  """The loop on the random-access path (--in_memory=false) and on the in-memory path, same seed, with
  --d_steps=2 and --steps_per_call=2 on 4 devices: the same losses at every step and the same final
  state, bit for bit. Catches any difference of images or order between the paths, in the loop."""
  for mode in ("true", "false"):
    train.train_and_evaluate(settings(tiny_data_dir, in_memory=mode), str(tmp_path / mode))
  lines = {m: read_jsonl(tmp_path / m / "metrics.jsonl") for m in ("true", "false")}
  drop = lambda ls: [{k: v for k, v in l.items() if k not in ("steps_per_sec", "images_per_sec")} for l in ls]
  assert [l["step"] for l in lines["false"]] == [2, 4]  # logged after each 2-step call
  assert drop(lines["true"]) == drop(lines["false"])
  a, b = (checkpoints.read_state_numpy(str(tmp_path / m))[0] for m in ("true", "false"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_data_benchmark_prints_one_json_line(tiny_data_dir):
  """python -m dcgan_jax.data_benchmark times the reader alone and training fed in memory and by index,
  on a real (here: tiny, prepared) dataset. Catches a benchmark that does not run or reports the wrong
  path."""
  import json
  import subprocess
  import sys
  from helpers import ROOT, cli_env
  r = subprocess.run([sys.executable, "-m", "dcgan_jax.data_benchmark", "--dataset=fashion_mnist",
                      f"--data_dir={tiny_data_dir}", "--batch_size=8", "--steps=2", "--warmup=1"],
                     cwd=ROOT, env=cli_env(2), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  assert result["reader_images_per_sec"] > 0 and result["devices"] == 2
  assert set(result["train_images_per_sec"]) == {"in_memory", "by_index"}
  assert result["by_index_over_in_memory"] > 0
