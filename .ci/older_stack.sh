#!/usr/bin/env bash
# The README's Colab install cell on an older Colab stack: TensorFlow 2.19.1 with
# Keras 3.10.0 (so protobuf < 6). In a fresh venv the cell must only add what is
# missing (no installed package moves), leave `pip check` clean, import keras_cv
# without errors, and let textual_inversion.py train 2 steps (with the stand-in VAE and UNet).
#
# Usage: bash .ci/older_stack.sh [README.md]   (default: README.md of this repo)
# The cell is the first ```python block after the line `## In Colab`; its lines that
# begin with `!` run as shell commands with the venv's bin first on PATH, each in its
# own shell as in Colab; other lines (Python, %magics, comments) are ignored.
# PYTHON picks the interpreter for the venv (default python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
readme="${1:-$root/README.md}"
python="${PYTHON:-python3}"
start=$SECONDS

section() { printf '\n===== %s =====\n' "$*"; }
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

[ -f "$readme" ] || fail "no README at $readme"
readme="$(cd "$(dirname "$readme")" && pwd)/$(basename "$readme")"

work="$(mktemp -d "${TMPDIR:-/tmp}/older-stack.XXXXXX")"
# Removing the venv (about 2.4 GB) can take a minute or two on a slow disk.
trap 'echo "removing $work"; rm -rf "$work"' EXIT

section "Colab cell from $readme"
# The first ```python block after `## In Colab`, minus its fences.
awk '
  { sub(/\r$/, "") }
  !seen && /^## In Colab[[:space:]]*$/ { seen = 1; next }
  seen == 1 && /^```python[[:space:]]*$/ { seen = 2; next }
  seen == 2 && /^```/ { exit }
  seen == 2 { print }
' "$readme" > "$work/cell.py"
[ -s "$work/cell.py" ] || fail "no \`\`\`python block after '## In Colab' in $readme"
cat "$work/cell.py"
grep -E '^[[:space:]]*!' "$work/cell.py" | sed -E 's/^[[:space:]]*!+//' > "$work/cell.sh" || true
[ -s "$work/cell.sh" ] || fail "the Colab cell has no '!' shell lines"

section "Older stack: tensorflow==2.19.1 keras==3.10.0 matplotlib pillow"
"$python" -m venv "$work/venv"
vpy="$work/venv/bin/python"
"$vpy" -m pip install -q tensorflow==2.19.1 keras==3.10.0 matplotlib pillow
"$vpy" -m pip freeze | sort -f > "$work/before.txt"
grep -iE '^(tensorflow|keras|protobuf|numpy|ml.dtypes)==' "$work/before.txt"

section "pip check before the cell"
"$vpy" -m pip check || echo "(the older stack is not clean by itself)"

section "Running the cell's shell lines"
mkdir -p "$work/content"
while IFS= read -r line; do
  printf '$ %s\n' "$line"
  status=0
  (cd "$work/content" &&
    PATH="$work/venv/bin:$PATH" VIRTUAL_ENV="$work/venv" bash -c "$line" < /dev/null) || status=$?
  [ "$status" -eq 0 ] || fail "cell line exited $status: $line"
done < "$work/cell.sh"

section "What the cell installed or changed"
"$vpy" -m pip freeze | sort -f > "$work/after.txt"
# Each line: name old -> new ("-" where absent).
moved="$(awk -F'==' '
  NR == FNR { old[tolower($1)] = $2; name[tolower($1)] = $1; next }
  { k = tolower($1); new[k] = $2; name[k] = $1 }
  END {
    for (k in name) {
      o = (k in old) ? old[k] : "-"
      n = (k in new) ? new[k] : "-"
      if (o != n) printf "%s %s -> %s\n", name[k], o, n
    }
  }
' "$work/before.txt" "$work/after.txt" | sort -f)"
echo "${moved:-(nothing)}"
changed="$(grep -v ' - -> ' <<<"$moved" || true)"
[ -z "$changed" ] || fail "the cell moved packages that were already installed:
$changed"

section "pip check after the cell"
"$vpy" -m pip check || fail "pip check is not clean after the cell"

section "import keras_cv"
# tensorflow_datasets (which keras_cv imports) logs, rather than raises, a protobuf
# gencode/runtime mismatch, so look for a traceback in what the import prints.
(cd "$work" && TF_CPP_MIN_LOG_LEVEL=2 "$vpy" -c \
  "import keras_cv; from keras_cv.models import StableDiffusion; print('keras_cv', keras_cv.__version__)" \
  > "$work/import.log" 2>&1) || { cat "$work/import.log"; fail "import keras_cv failed"; }
if grep -qE 'Traceback|VersionError' "$work/import.log"; then
  cat "$work/import.log"
  fail "import keras_cv printed a traceback"
fi
grep '^keras_cv ' "$work/import.log"

section "Smoke run: textual_inversion.py, 2 steps at 128 px, the stand-in VAE and UNet"
# CI has no internet: seed the Keras cache with the CLIP vocabulary, as .ci/run does.
vocab="$root/../shared/data/bpe_simple_vocab_16e6.txt.gz"
cache="${KERAS_HOME:-$HOME/.keras}/datasets"
if [ -f "$vocab" ] && [ ! -f "$cache/bpe_simple_vocab_16e6.txt.gz" ]; then
  mkdir -p "$cache"
  cp "$vocab" "$cache/"
fi
smoke_start=$SECONDS
status=0
# The stand-ins (tests/stand_ins.py) keep KerasCV's text encoder and tokenizer: what the
# older stack must run is the script's wiring, not a full-size UNet.
(cd "$root" && "$vpy" tests/stand_ins.py textual_inversion.py --random-weights --resolution 128 \
  --max-train-steps 2 --sample-every 0 --sample-steps 1 \
  --output-dir "$work/smoke" > "$work/smoke.log" 2>&1) || status=$?
if [ "$status" -ne 0 ] || ! grep -q '^Trained ' "$work/smoke.log"; then
  tail -n 40 "$work/smoke.log"
  fail "smoke run exited $status without a 'Trained ...' line"
fi
grep '^Trained ' "$work/smoke.log"
echo "smoke run: $((SECONDS - smoke_start)) s"

section "older stack: OK in $((SECONDS - start)) s"
