#!/usr/bin/env bash
# Mutation testing of the data2vec objective (not in CI: slow). Runs mutmut 3 over
# d2v_train/objective/ and d2v_train/lightning/pretrain.py with the tests that guard them, in a
# scratch copy of the repository (mutmut rewrites the sources it mutates), then prints the counts.
#
#   pip install "mutmut>=3,<4"
#   scripts/mutation_test.sh                  # WORK=/tmp/d2v_mutation, TIMEOUT=1800 s, JOBS=2
#   WORK=/tmp/m TIMEOUT=600 scripts/mutation_test.sh
#   TESTS="tests/test_ema.py" GLOBS="d2v_train.objective.ema.*" scripts/mutation_test.sh   # a subset
#   SAMPLE=250 GLOBS="d2v_train.lightning.pretrain.*" scripts/mutation_test.sh   # 250 random mutants per glob
#   (cd /tmp/d2v_mutation && mutmut results)  # the survivors; `mutmut show <name>` prints a diff
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-/tmp/d2v_mutation}"
TIMEOUT="${TIMEOUT:-1800}"
JOBS="${JOBS:-2}"
SAMPLE="${SAMPLE:-0}"   # > 0: test a seeded random sample of this many mutants per glob (large files)
PY="${PYTHON:-python}"
TESTS="${TESTS:-tests/test_objective_guards.py tests/test_pretrain.py tests/test_targets.py tests/test_loss.py tests/test_ema.py tests/test_masking.py tests/test_d2v2.py tests/test_d2v2_guards.py tests/test_decoder_guards.py}"

rm -rf "$WORK" && mkdir -p "$WORK"
(cd "$ROOT" && git ls-files -z | xargs -0 cp -P --parents -t "$WORK")
cat > "$WORK/setup.cfg" <<CFG
[mutmut]
source_paths = d2v_train
only_mutate =
    d2v_train/objective/*
    d2v_train/lightning/pretrain.py
also_copy =
    configs
debug = true
pytest_add_cli_args_test_selection =
$(for t in $TESTS; do echo "    $t"; done)
CFG
# the mutated copy must be the d2v_train the tests import: drop an editable install's finder
# (a conftest in tests/, which pytest imports from its own folder whatever mutmut does to sys.path)
cat > "$WORK/tests/conftest.py" <<'PY'
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", type(f).__name__)]
PY
cd "$WORK"
mkdir -p "$WORK/mutants"  # must exist before Python starts, or its path cache skips it for good
export OMP_NUM_THREADS=1 PYTHONPATH="$WORK/mutants:$WORK"
start=$(date +%s)
# cheapest, most central files first, so a time-capped run still scores the objective's core
GLOBS="${GLOBS:-d2v_train.objective.targets.* d2v_train.objective.loss.* d2v_train.objective.ema.* d2v_train.objective.decoder.* d2v_train.objective.multimask.* d2v_train.lightning.pretrain.* d2v_train.objective.config.* d2v_train.objective.masking.*}"
if [ "$SAMPLE" -gt 0 ]; then  # mutmut writes every mutant on its first run; a glob that matches none runs nothing
  "$PY" -m mutmut run --max-children "$JOBS" "none.matches.*" >> mutmut.log 2>&1 || true
  "$PY" -m mutmut results --all true 2>/dev/null | awk -F': ' '/not checked/ {gsub(/^ +/, "", $1); print $1}' > all_mutants.txt
fi
for glob in $GLOBS; do
  left=$(( TIMEOUT - ($(date +%s) - start) ))
  [ "$left" -gt 30 ] || { echo "time cap reached before $glob"; break; }
  targets=("$glob")
  if [ "$SAMPLE" -gt 0 ]; then
    prefix="${glob%\*}"
    mapfile -t targets < <(grep -F "$prefix" all_mutants.txt | "$PY" -c "import random, sys; names = sys.stdin.read().split(); print('\n'.join(random.Random(0).sample(names, min($SAMPLE, len(names)))))")
    [ "${#targets[@]}" -gt 0 ] && [ -n "${targets[0]}" ] || { echo "== $glob: no mutants"; continue; }
  fi
  echo "== $glob (${#targets[@]} mutants or a glob; ${left}s left)"
  timeout "$left" "$PY" -m mutmut run --max-children "$JOBS" "${targets[@]}" >> mutmut.log 2>&1 || echo "   stopped (exit $?)"
done
echo "wall: $(( $(date +%s) - start )) s (log: $WORK/mutmut.log)"
"$PY" -m mutmut results --all true > results.txt 2>/dev/null || true
echo "mutants by file and status:"
awk -F': ' 'NF==2 {split($1, a, "."); print a[1] "." a[2] "." a[3], $2}' results.txt | sort | uniq -c
echo "overall:"; awk -F': ' 'NF==2 {print $2}' results.txt | sort | uniq -c
