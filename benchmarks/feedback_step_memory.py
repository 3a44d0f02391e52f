"""Median step time and peak saved bytes per rule against backprop: LeNet, a Fashion-MNIST batch of 64,
one torch thread. Usage: OMP_NUM_THREADS=1 python benchmarks/feedback_step_memory.py relu|tanh"""
import statistics
import sys
import time
import torch
torch.set_num_threads(1)
from fa_rules.plugins.manager import get_registry
from fa_rules.core.autodiff import SavedTensorsProbe
from fa_rules.core.data import as_float
from fa_rules.core.rule import Batch
from fa_rules.core.trainer import TrainConfig, make_optimizers, apply_updates
reg = get_registry()
ds = reg.dataset("fashion_mnist").load(None)
activation = sys.argv[1]
xs = as_float(ds.train_x[:64 * 25]); ys = ds.train_y[:64 * 25]
rows = {}
for name, opts in [("backprop", {}), ("feedback_alignment", {}), ("direct_feedback_alignment", {}),
                   ("direct_feedback_alignment", {"projection": "conv"}), ("bidirectional_fa", {}),
                   ("bidirectional_dfa", {}), ("weight_mirror", {}), ("brsf", {}), ("frsf", {}),
                   ("direct_random_target_projection", {})]:
    torch.manual_seed(0)
    net = reg.model("lenet").make((1, 28, 28), (10,), activation=activation)
    rule = reg.rule(name).make(**opts)
    params, state = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(0))
    opt = make_optimizers(TrainConfig(), params)
    times = []
    for i in range(25):
        b = Batch(xs[i * 64:(i + 1) * 64], ys[i * 64:(i + 1) * 64], seed=i)
        t = time.perf_counter()
        updates, state, _ = rule.step(net, params, state, b)
        apply_updates(rule, params, updates, opt)
        times.append(time.perf_counter() - t)
    with SavedTensorsProbe() as probe:
        rule.step(net, params, state, b)
    label = name + ("[conv]" if opts else "")
    rows[label] = (statistics.median(times[5:]), probe.peak)
bp_t, bp_m = rows["backprop"]
print(f"| rule ({activation}) | step ms | step x backprop | saved MiB | saved x backprop |")
for k, (t, m) in rows.items():
    print(f"| {k} | {t*1e3:.1f} | {t/bp_t:.2f} | {m/2**20:.2f} | {m/bp_m:.2f} |")
