"""python -m dcgan_jax.study --report=DIR: a page built from a small real study, opened in headless
Chromium. CI's script installs Chromium (Debian's chromium package); where it is missing the test is
skipped, with the reason in pytest's summary."""
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from dcgan_jax import train
from dcgan_jax.config import Config
from helpers import ROOT

pytestmark = pytest.mark.slow  # trains 6 members and starts a browser


def chromium():
  found = shutil.which("chromium") or shutil.which("chromium-browser")
  if not found:
    pytest.skip("chromium not installed (apt-get install chromium; .ci/run installs it)")
  return found


def test_report_of_a_real_study_opens_in_chromium_with_every_image(tiny_data_dir, tmp_path):
  """2 configurations (--sweep=learning_rate_d:1e-4,2e-4) x 3 seeds, 4 steps each, with sample grids;
  `study --report` writes index.html whose tables carry each configuration's interval and the pair's
  verdict, and whose images (per metric a curve and a strip; per configuration its median and best
  seed's grids) Chromium decodes, all of them, in a screenshot that is not blank. Catches a page whose
  images are missing or unreadable, plots that are empty, grids of the wrong runs, and a report
  without the statistics."""
  browser = chromium()
  study_dir = str(tmp_path / "runs")
  train.train_and_evaluate(Config(dataset="fashion_mnist", data_dir=tiny_data_dir, batch_size=8, latent_dim=16,
                                  num_steps=4, log_every=1, sample_every=2, checkpoint_every=4,
                                  seeds="0-2", sweep="learning_rate_d:1e-4,2e-4"), study_dir)
  out = tmp_path / "report"
  r = subprocess.run([sys.executable, "-m", "dcgan_jax.study", f"--report={out}", "--metrics=d_loss,g_loss",
                      study_dir], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  page = (out / "index.html").read_text()
  assert "learning_rate_d=0.0001" in page and "no difference shown" in page and "95% interval" in page
  images = sorted(p.name for p in out.glob("*.png"))
  assert images == ["curve_d_loss.png", "curve_g_loss.png", "final_d_loss.png", "final_g_loss.png",
                    "grid_0_best.png", "grid_0_median.png", "grid_1_best.png", "grid_1_median.png"], images
  for name in images:
    pixels = np.asarray(Image.open(out / name).convert("L"), np.float32)
    assert pixels.std() > 1.0, name  # not a blank image
  # The grids are the members' newest ones: those of the run with the median and the best d_loss.
  grids = {p.name: p.read_bytes() for p in out.glob("grid_*.png")}
  members = [os.path.join(study_dir, d, "samples", "step_00000004.png") for d in sorted(os.listdir(study_dir))
             if os.path.isdir(os.path.join(study_dir, d))]
  assert all(any(open(m, "rb").read() == g for m in members) for g in grids.values())

  flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
  dom = subprocess.run([browser, *flags, "--dump-dom", f"file://{out}/index.html"], capture_output=True,
                       text=True, timeout=120)
  assert "images shown: 8 of 8" in dom.stdout, dom.stdout[-2000:] + dom.stderr[-2000:]
  shot = tmp_path / "shot.png"
  subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,3000",
                  f"file://{out}/index.html"], capture_output=True, timeout=120, check=True)
  pixels = np.asarray(Image.open(shot).convert("L"), np.float32)
  assert pixels.shape == (3000, 1200) and pixels.std() > 10.0
