"""Comparative benchmarks: run many rules on identical settings, collect one row per cell, report.

A *suite* (a TOML file, or the flags of `fa-rules benchmark`) names rules, shared training
settings, seeds and optionally settings to vary. Each *cell* is one (rule, seed, varied settings)
combination and trains in its own run directory `DIR/runs/<cell>/` through
`fa_rules.runs.new_trainer`, so every rule of a seed starts from the same initial weights, sees the
same data order and meets the same optimiser (`TrainConfig.seed` fixes all three).

Suite format (every key but `rules` is optional):

    name = "fashion_mnist_lenet"          # default: the file name
    description = "one paragraph for the report"
    rules = ["backprop", "feedback_alignment",           # a name, or a table:
             { name = "dtp", label = "dtp_noise", options = { noise = 0.1 } }]
    seeds = 3                              # 3 means [0, 1, 2]; or a list [0, 5, 7]
    reference = "backprop"                 # label the ratios are taken against (default backprop)

    [settings]                             # TrainConfig fields shared by every cell
    dataset = "fashion_mnist"
    model = "mlp"
    depth = 5                              # a key that is no TrainConfig field is a model option
    epochs = 10

    [vary]                                 # optional grid: every combination is a cell
    depth = [4, 8, 16]

    [measure]                              # optional extra measurements
    probe = false                          # linear-probe accuracy on the trained features
    fid = true                             # FID of generative rules (default: true)
    fid_samples = 10000
    sample_batch = 1                       # time per sample: batches of this size ...
    sample_repeats = 20                    # ... timed this often (median)

    [anchors.test_error]                   # published numbers shown beside ours
    source = "where the numbers come from"
    backprop = 0.092                       # label = value, in the units of our metric

    [quick]                                # a partial suite merged over this one by --quick
    seeds = 1
    [quick.settings]
    epochs = 1

A rule table may hold `name`, `label` (unique; default the name), `options` (rule options) and
the per-rule settings `model`, `model_options`, `group_lr` (groups the rule owns, never `model`),
`latent_dim` and `eval_every`; the report lists such overrides. Optimiser settings of the model are never per rule.

Outputs in DIR, rewritten atomically after every cell: `results.json` (a list of rows, one per
rule and seed and varied setting), `results.csv`, `report.md`; the plots at the end (and on
Ctrl-C); `suite.json` (the resolved suite) and `machine.json` (the machines and dates that trained
cells, which the report names). Unknown names and options, bad settings and suites of more than
MAX_CELLS cells are refused before any cell trains. A cell whose rule fails or diverges gets a row
with `status` and `error`, and the suite goes on. Rerunning the same command skips finished cells
(`row.json` in the cell directory) and continues an interrupted or failed cell from its last epoch
checkpoint. One process at a time runs in DIR (`DIR/.benchmark.lock`).
"""

from fa_rules.benchmark.aggregate import add_ratios, aggregate
from fa_rules.benchmark.cells import Cell, check_cells, plan_cells
from fa_rules.benchmark.live import LiveTable
from fa_rules.benchmark.report import (
    comparison_rich, comparison_table, machine_description, print_whole, record_machine, render_report,
    write_outputs, write_report_copy,
)
from fa_rules.benchmark.runner import check_cell_dir, output_lock, run_cell, run_suite
from fa_rules.benchmark.suite import (
    ANCHORABLE, LOCK_FILE, MAX_CELLS, MEASURE_DEFAULTS, METRICS, REPORT_MD, RESULTS_CSV, RESULTS_JSON, ROW_FILE,
    RUNS_DIR, SUITE_JSON, RuleEntry, Suite, cell_count, load_suite, override_settings, safe_name,
    select_rules, suite_from_dict,
)

__all__ = [
    "ANCHORABLE", "LOCK_FILE", "MAX_CELLS", "MEASURE_DEFAULTS", "METRICS", "REPORT_MD", "RESULTS_CSV", "RESULTS_JSON", "ROW_FILE", "RUNS_DIR",
    "SUITE_JSON", "Cell", "LiveTable", "RuleEntry", "Suite", "add_ratios", "aggregate", "cell_count",
    "check_cell_dir", "check_cells",
    "comparison_rich", "comparison_table", "load_suite", "machine_description", "output_lock", "override_settings",
    "plan_cells", "print_whole", "record_machine", "render_report", "run_cell", "run_suite", "safe_name", "select_rules",
    "suite_from_dict", "write_outputs", "write_report_copy",
]
