#!/usr/bin/env bash
# Downloads the peers' wheels (pure Python) into .whl/ for scripts/gpu_bench.sh on a machine
# without network access. Their dependencies (torchvision, OpenCV, scikit-learn, matplotlib) are
# expected there; only these four are fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-path info/exclude)"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
python3 -m pip download --no-deps --only-binary=:all: -d .whl captum torchcam grad-cam ttach
