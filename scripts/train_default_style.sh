#!/bin/sh
# Trains the style shipped inside the package (styleshift/assets/impressionism.safetensors), the one
# `styleshift apply` uses when no --style is given: the fast preset on the bundled sample
# (data/sample/photos -> data/sample/paintings, 29 photos and 50 impressionist paintings).
#
# Time on a 2-core CPU: the shipped style took 60 min 43 s on a 2-core AMD EPYC while other work shared the
# machine (median 0.138 s/step, 0.12 s/step at its quietest: about 37 minutes alone). The fast preset's
# 0.31 s/step measured on a 2-core Xeon (AVX-512) gives about 85 minutes there. Under 2 hours on both.
# Interrupted (Ctrl-C, or killed), running the script again resumes where the last checkpoint left off.
#
#   sh scripts/train_default_style.sh            # 16000 steps
#   STEPS=2000 sh scripts/train_default_style.sh # a quick try
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
STEPS=${STEPS:-16000}
RUN=runs/default-style
# Train outside the user's style library: the result is shipped, not registered.
export STYLESHIFT_HOME="$RUN/library"
start=$(date +%s)
"$PYTHON" -m styleshift train data/sample/photos data/sample/paintings --name impressionism --run-dir "$RUN" \
    --preset fast --steps "$STEPS" --checkpoint-every 1000 --sample-every 1000 "$@"
end=$(date +%s)
# Shipped as the run exported it, less the path of the run directory (it means nothing on another machine),
# with the date it was finished.
"$PYTHON" - "$RUN/impressionism.safetensors" styleshift/assets/impressionism.safetensors <<'PY'
import sys
from datetime import datetime, timezone

from styleshift.checkpoint import DIRECTIONS, export_style, load_style

style = load_style(sys.argv[1])
meta = {k: v for k, v in style.meta.items() if k != "run_dir"}
meta.setdefault("date", datetime.now(timezone.utc).isoformat(timespec="seconds"))
export_style(sys.argv[2], style.name, style.generator, {d: style.build(d) for d in DIRECTIONS}, meta)
PY
echo "trained in $(( (end - start) / 60 )) min $(( (end - start) % 60 )) s (this invocation);" \
     "shipped styleshift/assets/impressionism.safetensors ($(du -k styleshift/assets/impressionism.safetensors | cut -f1) KiB)"
