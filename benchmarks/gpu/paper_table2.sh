#!/usr/bin/env bash
# The feature alignment paper's Table 2 (FID) and Table 3 (size, time per sample) at full width on
# one GPU: ae, vae, gan, vfa and vfa_gan with the paper's networks (appendix Tables 7-8, 10-12) and
# settings, three seeds, FID over 10,000 samples, on MNIST, Fashion-MNIST and CIFAR-10.
#
# What it expects of the machine:
#   - one CUDA GPU (16 GB is plenty: the largest step, a full-width VAE on CIFAR-10 at batch 128,
#     holds well under 2 GB), fa-rules installed (`pip install -e .` from the repository root);
#   - the data in $FA_RULES_DATA_DIR (else ~/.cache/fa-rules/data): MNIST, Fashion-MNIST and CIFAR-10
#     are downloaded by torchvision when the machine is online; offline, put the files where the
#     one-line error of the first run says;
#   - the Inception weights of pytorch-fid: FA_RULES_FID_WEIGHTS=/path/pt_inception-2015-12-05-6726825d.pth
#     (or torch hub's cache); without them each row carries a note instead of an FID.
#   - time: 45 cells of 50 epochs; budget a few hours on a recent GPU (the quick form: minutes).
#
# Resumable: run the same command again after an interruption; finished cells are skipped and an
# interrupted cell continues from its last finished epoch.
#
# Usage (from the repository root):
#   bash benchmarks/gpu/paper_table2.sh            # the full comparison, reports in benchmarks/reports/
#   bash benchmarks/gpu/paper_table2.sh --quick    # 1 epoch, 1 seed, FID over 2,000 samples
# Outputs: runs/paper_table2[-quick]/{mnist,fashion_mnist,cifar10}/ (results.json, report.md, plots)
# and benchmarks/reports/paper_table2_{mnist,fashion_mnist,cifar10}[_quick].md.
set -uo pipefail
cd "$(dirname "$0")/../.."

quick=()
suffix=""
if [ "${1:-}" = "--quick" ]; then
    quick=(--quick)
    suffix="_quick"
fi
out="runs/paper_table2${suffix/_/-}"

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU visible to torch; this job is meant for a GPU machine" >&2
    exit 2
fi
python - <<'EOF'
import torch
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
EOF

status=0
run() {  # run NAME SUITE [extra flags]: a failed cell makes the job's status non-zero, the rest go on
    local name=$1 suite=$2
    shift 2
    python -m fa_rules benchmark "$suite" "${quick[@]}" --device cuda --quiet --out "$out/$name" \
        --report "benchmarks/reports/paper_table2_${name}${suffix}.md" "$@" || status=1
}
run mnist benchmarks/paper_table2_mnist.toml
# Fashion-MNIST: the MNIST suite on the other 28x28 dataset (its anchors stay the paper's MNIST numbers)
run fashion_mnist benchmarks/paper_table2_mnist.toml --dataset fashion_mnist
run cifar10 benchmarks/paper_table2_cifar10.toml
exit $status
