import os

import torch

# One thread per process: tests start training subprocesses (torchrun starts two), and on a small
# machine several processes with several threads each oversubscribe the cores badly.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# Tests never download: loaders must use files the tests write, or fail with one clear line.
os.environ["FA_RULES_OFFLINE"] = "1"
os.environ.setdefault("FA_RULES_DATA_DIR", os.path.join(os.path.dirname(__file__), ".data-unused"))

# FID's cache of real-image features goes to a throw-away folder, not the user's home.
if "FA_RULES_FID_CACHE" not in os.environ:
    import tempfile

    os.environ["FA_RULES_FID_CACHE"] = tempfile.mkdtemp(prefix="fa-rules-fid-cache-")
