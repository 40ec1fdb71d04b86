"""Sample quality: the metrics (metrics.py: FID, KID, precision/recall, Inception Score, mode counts),
the project's own evaluator network (evaluator.py) and pytorch-fid's Inception network with its weights
(inception.py, inception_metrics.py, torch_file.py). Imports the data path (datasets/) and the generator
helpers of sampling.py; nothing of training."""
