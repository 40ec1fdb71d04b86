"""Records tests/fixtures/torch_reference.npz: gradients computed by code that others wrote or that follows
their published PyTorch code, on inputs drawn here, for tests/test_variant_maths.py to compare with ours
(the tests read the file and need no torch).

    python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch==2.14.1 numpy
    /tmp/torch/bin/python experiments/torch_reference_fixtures.py --out=tests/fixtures/torch_reference.npz

What it records (all float64 inputs rounded to float32 first, torch computing in float64):
* spectral_*: torch.nn.utils.spectral_norm (one power iteration, training mode) on an nn.Linear(4, 3)
  and an nn.Conv2d(2, 3, 4, stride 2, padding 1) with a given u: the output, the updated u, and the
  weight's and bias's gradients of sum(output * cotangent). torch's weight is (out, in[, kh, kw]); the
  file stores it, and its gradient, in flax's layout ((in, out) and (kh, kw, in, out)), images NHWC.
* loss_*: each --loss written with torch.nn.functional as PyTorch-StudioGAN writes it; the gradients of
  D's loss with respect to the real and fake logits and of G's loss with respect to the fake logits.
* gp_* and r1_*: the WGAN-GP penalty as the authors' PyTorch port writes it (autograd.grad with
  create_graph, the norm per example over the flattened gradient, lambda * mean((norm - 1)^2)), and R1
  as Mescheder et al.'s code (gamma / 2 * mean of the squared gradient norm at real images), on a tiny
  critic x -> tanh(x W1 + b1) w2: the gradients with respect to W1, b1 and w2.
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F

LOSSES = ("non_saturating", "minimax", "least_squares", "hinge", "wasserstein")


def f32(rng, *shape, scale=1.0):
  return (rng.normal(size=shape) * scale).astype(np.float32).astype(np.float64)


def spectral(layer, x, u, cotangent):
  """Output, updated u, and (weight, bias) gradients of one training-mode pass of torch's spectral_norm."""
  layer = torch.nn.utils.spectral_norm(layer.double(), n_power_iterations=1)
  layer.weight_u.copy_(torch.from_numpy(u))
  layer.train()
  y = layer(torch.from_numpy(x))
  (y * torch.from_numpy(cotangent)).sum().backward()
  return (y.detach().numpy(), layer.weight_u.detach().numpy(), layer.weight_orig.grad.numpy(),
          layer.bias.grad.numpy())


def losses(kind, real, fake):
  """(d_loss, g_loss) as PyTorch-StudioGAN's loss functions write them (means over the batch)."""
  if kind in ("non_saturating", "minimax"):
    d = F.softplus(-real).mean() + F.softplus(fake).mean()
    g = F.softplus(-fake).mean() if kind == "non_saturating" else -F.softplus(fake).mean()
  elif kind == "least_squares":
    d = 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake ** 2).mean()
    g = 0.5 * ((fake - 1) ** 2).mean()
  elif kind == "hinge":
    d = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    g = -fake.mean()
  else:
    d = fake.mean() - real.mean()
    g = -fake.mean()
  return d, g


def critic(params, x):
  w1, b1, w2 = params
  return torch.tanh(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2  # (batch, 1)


def penalties(w1, b1, w2, real, fake, eps, gp_weight, r1_gamma):
  """Parameter gradients of the WGAN-GP penalty and of R1, each alone."""
  out = {}
  for name in ("gp", "r1"):
    params = [torch.from_numpy(a).requires_grad_(True) for a in (w1, b1, w2)]
    if name == "gp":
      alpha = torch.from_numpy(eps).reshape(-1, 1, 1, 1)
      x = (alpha * torch.from_numpy(real) + (1 - alpha) * torch.from_numpy(fake)).requires_grad_(True)
      d = critic(params, x)
      grads = torch.autograd.grad(d, x, grad_outputs=torch.ones_like(d), create_graph=True)[0]
      penalty = gp_weight * ((grads.reshape(grads.shape[0], -1).norm(2, dim=1) - 1) ** 2).mean()
    else:
      x = torch.from_numpy(real).requires_grad_(True)
      d = critic(params, x)
      grads = torch.autograd.grad(d.sum(), x, create_graph=True)[0]
      penalty = r1_gamma / 2 * grads.pow(2).reshape(grads.shape[0], -1).sum(1).mean()
    penalty.backward()
    for key, p in zip(("w1", "b1", "w2"), params):
      out[f"{name}_grad_{key}"] = p.grad.numpy()
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--out", default="tests/fixtures/torch_reference.npz")
  args = parser.parse_args()
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  record = {"torch_version": np.array(torch.__version__)}

  # spectral normalisation: a dense layer and a strided convolution
  w, b, u = f32(rng, 3, 4), f32(rng, 3), f32(rng, 3)
  x, cot = f32(rng, 5, 4), f32(rng, 5, 3)
  dense = torch.nn.Linear(4, 3)
  with torch.no_grad():
    dense.weight.copy_(torch.from_numpy(w)); dense.bias.copy_(torch.from_numpy(b))
  y, u1, gw, gb = spectral(dense, x, u, cot)
  record.update(spectral_dense_kernel=w.T, spectral_dense_bias=b, spectral_dense_u=u, spectral_dense_x=x,
                spectral_dense_cotangent=cot, spectral_dense_y=y, spectral_dense_u1=u1,
                spectral_dense_grad_kernel=gw.T, spectral_dense_grad_bias=gb)
  w, b, u = f32(rng, 3, 2, 4, 4), f32(rng, 3), f32(rng, 3)
  x, cot = f32(rng, 2, 8, 8, 2), f32(rng, 2, 4, 4, 3)
  conv = torch.nn.Conv2d(2, 3, 4, stride=2, padding=1)
  with torch.no_grad():
    conv.weight.copy_(torch.from_numpy(w)); conv.bias.copy_(torch.from_numpy(b))
  nchw = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2))
  y, u1, gw, gb = spectral(conv, nchw(x), u, nchw(cot))
  to_flax = lambda k: k.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
  record.update(spectral_conv_kernel=to_flax(w), spectral_conv_bias=b, spectral_conv_u=u,
                spectral_conv_x=x, spectral_conv_cotangent=cot, spectral_conv_y=y.transpose(0, 2, 3, 1),
                spectral_conv_u1=u1, spectral_conv_grad_kernel=to_flax(gw), spectral_conv_grad_bias=gb)

  # losses: gradients with respect to the logits
  real, fake = f32(rng, 6, 1, scale=2.0), f32(rng, 6, 1, scale=2.0)
  record.update(loss_real=real, loss_fake=fake)
  for kind in LOSSES:
    r, f = torch.from_numpy(real).requires_grad_(True), torch.from_numpy(fake).requires_grad_(True)
    d, _ = losses(kind, r, f)
    d.backward()
    f2 = torch.from_numpy(fake).requires_grad_(True)
    losses(kind, torch.from_numpy(real), f2)[1].backward()
    record.update({f"loss_{kind}_d_grad_real": r.grad.numpy(), f"loss_{kind}_d_grad_fake": f.grad.numpy(),
                   f"loss_{kind}_g_grad_fake": f2.grad.numpy()})

  # penalties on a tiny critic of (batch, 4, 4, 1) images
  w1, b1, w2 = f32(rng, 16, 8, scale=0.5), f32(rng, 8, scale=0.1), f32(rng, 8, 1)
  real, fake, eps = f32(rng, 4, 4, 4, 1), f32(rng, 4, 4, 4, 1), rng.uniform(size=4).astype(np.float32)
  eps = eps.astype(np.float64)
  record.update(penalty_w1=w1, penalty_b1=b1, penalty_w2=w2, penalty_real=real, penalty_fake=fake,
                penalty_eps=eps, gp_weight=np.array(10.0), r1_gamma=np.array(0.5))
  record.update(penalties(w1, b1, w2, real, fake, eps, 10.0, 0.5))
  np.savez(args.out, **record)
  print(f"wrote {args.out}: {len(record)} arrays, torch {torch.__version__}")


if __name__ == "__main__":
  main()
