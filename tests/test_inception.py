"""The FID Inception network against pytorch-fid's own features, the torch.save reader, and the Inception
Score. Fast tier; no torch needed (the fixtures were recorded by experiments/inception_reference_fixtures.py).
"""
import collections
import os
import pickle
import zipfile

import numpy as np
import pytest

from dcgan_jax.evaluation import inception

from dcgan_jax.evaluation import inception_metrics

from dcgan_jax.evaluation import metrics

from dcgan_jax.evaluation import torch_file
from inception_fixture import FIXTURES, random_state_dict, random_variables, recorder, reference


def _relative(ours, theirs):
  """Per-image ||ours - theirs|| / ||theirs||, the largest."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.max(np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)))


def test_features_logits_and_fid_equal_pytorch_fids():
  """Our network and preprocessing give pytorch-fid's pool3 features and logits (its InceptionV3 with the
  same seeded weights, its own PNG-reading path) within 1e-4 relative per image, for 28x28 grey images
  (replicated to RGB, upsampled), 64x64 colour (upsampled) and 320x320 colour (downsampled), and FIDs
  between the groups within 1e-3 of pytorch-fid's calculate_frechet_distance. The weights' BatchNorm
  statistics were calibrated on real images, so the features vary across images (checked) and a wrong
  preprocessing cannot hide. Catches: an average pool that counts the padding in the A/C/E_1 blocks, an
  average pool in Mixed_7c, a nearest or antialiased resize, align_corners=True, a missing 2x - 1, the
  grey channel not replicated, BatchNorm's epsilon 1e-5, kernels not transposed from OIHW, the fc matrix
  not transposed."""
  ref = reference()
  embed = inception.features_program()
  variables = random_variables()
  ours = {}
  for group, images in recorder().groups(ref["grey28"]).items():
    pool3, logits = embed(variables, images)
    theirs = ref[f"{group}_pool3"]
    assert np.std(theirs, axis=0).mean() > 0.05 * np.abs(theirs).mean(), "degenerate reference features"
    assert _relative(pool3, theirs) < 1e-4, group
    assert _relative(logits, ref[f"{group}_logits"]) < 1e-4, group
    ours[group] = np.asarray(pool3)
  for a, b in (("grey28", "colour64"), ("colour64", "colour320")):
    assert metrics.fid(ours[a], ours[b]) == pytest.approx(float(ref[f"fid_{a}_{b}"]), rel=1e-3)


def test_torch_file_reads_both_torch_save_formats_and_runs_no_code(tmp_path):
  """dcgan_jax.evaluation.torch_file reads torch.save's zip format (inception_random_bn.pth, written as pytorch-fid's
  weights file is) and its legacy format (inception_legacy.pth) to the same tensors: the BatchNorm
  tensors agree between the two files, the legacy file's conv kernel equals the seeded rule that made
  it (so strides and layout are read right), num_batches_tracked is an int64 scalar. A pickle naming
  any other callable (here os.system) is refused before it runs, and a truncated file is an error.
  Catches a reader that ignores strides or offsets, mixes storages, or unpickles arbitrary globals."""
  zipped = torch_file.load_state_dict(os.path.join(FIXTURES, "inception_random_bn.pth"))
  legacy = torch_file.load_state_dict(os.path.join(FIXTURES, "inception_legacy.pth"))
  assert set(legacy) == {f"Conv2d_1a_3x3.{k}" for k in ("conv.weight", "bn.weight", "bn.bias",
                                                        "bn.running_mean", "bn.running_var",
                                                        "bn.num_batches_tracked")} | {"fc.bias"}
  for name in legacy:
    if ".bn." in name:
      np.testing.assert_array_equal(legacy[name], zipped[name])
  assert legacy["Conv2d_1a_3x3.bn.num_batches_tracked"].dtype == np.int64
  assert legacy["Conv2d_1a_3x3.bn.num_batches_tracked"].shape == ()
  np.testing.assert_array_equal(legacy["Conv2d_1a_3x3.conv.weight"],
                                recorder().random_weight("Conv2d_1a_3x3.conv.weight", (32, 3, 3, 3)))
  np.testing.assert_array_equal(legacy["fc.bias"], recorder().random_weight("fc.bias", (1008,)))
  assert legacy["Conv2d_1a_3x3.bn.running_var"].min() > 0  # calibrated statistics, not the initial 1s
  assert not np.all(legacy["Conv2d_1a_3x3.bn.running_var"] == 1)

  class Evil:
    def __reduce__(self):
      return (os.system, ("touch " + str(tmp_path / "ran"),))

  evil = tmp_path / "evil.pth"
  with zipfile.ZipFile(evil, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps(collections.OrderedDict(x=Evil()), protocol=2))
  with pytest.raises(torch_file.TorchFileError, match="posix.system|os.system"):
    torch_file.load_state_dict(str(evil))
  assert not (tmp_path / "ran").exists()
  with open(os.path.join(FIXTURES, "inception_legacy.pth"), "rb") as f:
    (tmp_path / "short.pth").write_bytes(f.read()[:-100])
  with pytest.raises(torch_file.TorchFileError, match="truncated"):
    torch_file.load_state_dict(str(tmp_path / "short.pth"))


def test_a_state_dict_of_another_network_is_refused():
  """variables_from_state_dict names a missing array, an unexpected one and a mis-shaped one (e.g.
  torchvision's ImageNet Inception with 1000 classes) instead of building a network from them. Catches a
  conversion that silently leaves random or zero weights where the file differs."""
  state = random_state_dict()
  missing = {k: v for k, v in state.items() if k != "Mixed_6a.branch3x3.conv.weight"}
  with pytest.raises(ValueError, match="1 arrays missing.*Mixed_6a.branch3x3.conv.weight"):
    inception.variables_from_state_dict(missing)
  with pytest.raises(ValueError, match="AuxLogits"):
    inception.variables_from_state_dict({**state, "AuxLogits.fc.weight": np.zeros((1008, 768))})
  with pytest.raises(ValueError, match=r"fc.weight has shape \(1000, 2048\)"):
    inception.variables_from_state_dict({**state, "fc.weight": np.zeros((1000, 2048), np.float32)})


def test_inception_score_of_known_class_distributions():
  """The Inception Score over 10 splits, against values known in closed form: samples spread evenly and
  confidently over 4 classes in every split score 4 (std 0); uniform predictions score 1; when each
  split holds one class only, every split scores 1 (a score over the whole set would say 10). Catches
  the softmax over the wrong axis, splits mixed or ignored, and log-probabilities used as probabilities."""
  confident = np.full((40, 1008), -50.0)
  confident[np.arange(40), np.arange(40) % 4] = 50.0
  mean, std = inception_metrics.inception_score(confident)
  assert mean == pytest.approx(4.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
  assert inception_metrics.inception_score(np.zeros((40, 1008)))[0] == pytest.approx(1.0, rel=1e-9)
  per_split = np.full((40, 1008), -50.0)
  per_split[np.arange(40), np.arange(40) // 4] = 50.0  # split s (4 consecutive samples) is class s
  assert inception_metrics.inception_score(per_split)[0] == pytest.approx(1.0, rel=1e-9)
  with pytest.raises(ValueError, match="at least 10"):
    inception_metrics.inception_score(np.zeros((9, 1008)))


def test_weights_are_converted_once_and_a_wrong_file_is_one_error(tmp_path, monkeypatch):
  """load_weights converts a state dict to Flax variables, caches them by the file's hash, and reads the
  cache the next time (the file is not parsed again); a torch.save file that is not the FID network
  (here the BatchNorm tensors alone) is a ConfigError naming the flag and the missing arrays, and a
  missing file names pytorch-fid's file; a damaged cache (cut short, or other variables) is converted
  again. Catches a cache keyed by something other than the file's contents, a conversion on every
  start, a damaged cache used as the variables, and a traceback instead of one line."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from dcgan_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  weights = tmp_path / "weights.pth"
  weights.write_bytes(b"any bytes: the reader is replaced below")
  state = random_state_dict()
  monkeypatch.setattr(torch_file, "load_state_dict", lambda path: state)
  first = inception_metrics.load_weights(str(weights), str(tmp_path / "cache"))
  assert os.path.exists(inception_metrics.converted_path(str(tmp_path / "cache"), first.sha256))

  def fail(path):
    raise AssertionError("parsed again")

  monkeypatch.setattr(torch_file, "load_state_dict", fail)
  second = inception_metrics.load_weights(str(weights), str(tmp_path / "cache"))
  assert jax.tree.all(jax.tree.map(np.array_equal, first.variables, second.variables))
  for damaged in (b"cut short", flax.serialization.msgpack_serialize({"params": {}})):
    with open(inception_metrics.converted_path(str(tmp_path / "cache"), first.sha256), "wb") as f:
      f.write(damaged)
    monkeypatch.setattr(torch_file, "load_state_dict", lambda path: state)
    again = inception_metrics.load_weights(str(weights), str(tmp_path / "cache"))
    assert jax.tree.all(jax.tree.map(np.array_equal, first.variables, again.variables))
  assert first.describe() == dict(file="weights.pth", sha256=first.sha256, pytorch_fid_weights=False)
  monkeypatch.undo()
  bn_only = os.path.join(FIXTURES, "inception_random_bn.pth")
  with pytest.raises(ConfigError, match=r"--inception_weights=.*arrays missing"):
    inception_metrics.load_weights(bn_only, str(tmp_path / "cache"))
  with pytest.raises(ConfigError, match="file not found.*pt_inception-2015-12-05-6726825d.pth"):
    inception_metrics.load_weights(str(tmp_path / "nothing.pth"), str(tmp_path / "cache"))
