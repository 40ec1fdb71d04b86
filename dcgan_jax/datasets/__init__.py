"""The data path: finding, preparing and reading datasets (input_pipeline.py: tfds; image_folder.py:
the user's own images; stacked.py: stacked Fashion-MNIST), and what the training loop passes to the step
(data.py: in memory, by index on host threads (host_reader.py) or streamed). Imports nothing from the
rest of dcgan_jax but its foundations."""
