"""What is measured on top of the engine: FID (`fid`), the linear probe (`probe`) and the
measurements of a trained run that the benchmark adds to its rows (`run`: FID, time per sample,
probe accuracy). The per-epoch measures the trainer itself records (test accuracy, reconstruction
error, angle to backprop, bytes saved for backward) are part of the engine (`fa_rules.core.metrics`,
`fa_rules.core.autodiff.SavedTensorsProbe`), since every run needs them."""
