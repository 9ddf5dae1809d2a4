#!/usr/bin/env bash
# Compatibility matrix: runs the generation, interop and attention-integration tests of this
# checkout against several releases of transformers / peft / accelerate, each set in its own clean
# virtualenv (no system site-packages), and prints one table row per set.
#
#   bash tools/compat_matrix.sh                      # rows oldest,middle,newest
#   bash tools/compat_matrix.sh --rows oldest,newest # the CI step
#   bash tools/compat_matrix.sh --rows pinned,5.23.0 # constraints/ci.txt; any transformers release
#   bash tools/compat_matrix.sh --list               # what each row installs
#
# Rows:
#   oldest   the declared lower bounds (pyproject.toml): transformers, peft, accelerate
#   middle   transformers 5.17.0 (the GPU image's), newest peft / accelerate
#   newest   the newest transformers, peft and accelerate the registry offers (pip index versions);
#            when that set cannot be installed (a dependency missing from the registry), the row says
#            so and a "newest-installable" row follows: what pip resolves for an unpinned install
#   pinned   the known-good versions of constraints/ci.txt (what the main CI test run installs)
#   X.Y.Z    transformers==X.Y.Z, newest peft / accelerate
#   P==V+Q==W  exactly these pins (e.g. transformers==5.0.0+peft==0.18.0), newest peft / accelerate
#            where not named
#
# Options: --rows LIST, --venv-dir DIR (default $COMPAT_VENV_DIR or /tmp/fastpeft-compat; venvs are
# reused, an editable install of this checkout so code changes need no reinstall), --fresh
# (recreate the venvs), --src DIR (test another checkout), --row-timeout S (per row, tests only;
# default 900), --list.  Environment: COMPAT_TORCH (default torch==2.13.0, the CPU build on disk
# here), COMPAT_TESTS (space-separated test files), PYTHON (the interpreter venvs are made from).
#
# Exit status: 0 when every row passed, 1 when a row failed or could not be installed, 2 on usage.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC=$ROOT
ROWS=oldest,middle,newest
VENV_DIR=${COMPAT_VENV_DIR:-/tmp/fastpeft-compat}
FRESH=0
LIST=0
ROW_TIMEOUT=900
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${COMPAT_TORCH:-torch==2.13.0}

# The oldest releases the compatibility subset passes on (keep in step with pyproject.toml's lower
# bounds and README "Supported versions").  torch's lower bound (2.6, with triton 3.4) is tested by
# .ci/run_oldest; the rows here use the CPU torch on disk for speed.
OLDEST_TRANSFORMERS=5.0.0
OLDEST_PEFT=0.21.0
OLDEST_ACCELERATE=0.32.0
MIDDLE_TRANSFORMERS=5.17.0

usage() { sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --rows) ROWS=$2; shift 2 ;;
    --rows=*) ROWS=${1#*=}; shift ;;
    --venv-dir) VENV_DIR=$2; shift 2 ;;
    --venv-dir=*) VENV_DIR=${1#*=}; shift ;;
    --src) SRC=$(cd "$2" && pwd); shift 2 ;;
    --src=*) SRC=$(cd "${1#*=}" && pwd); shift ;;
    --row-timeout) ROW_TIMEOUT=$2; shift 2 ;;
    --row-timeout=*) ROW_TIMEOUT=${1#*=}; shift ;;
    --fresh) FRESH=1; shift ;;
    --list) LIST=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "compat_matrix: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

export PIP_DISABLE_PIP_VERSION_CHECK=1

# newest release of a package the registry offers ("" when the registry cannot be asked)
newest() {
  "$PYTHON" -m pip index versions "$1" 2>/dev/null | sed -n 's/^'"$1"' (\([^)]*\)).*/\1/p' | head -1
}

declare -A NEWEST=()
newest_cached() {
  if [ -z "${NEWEST[$1]+x}" ]; then NEWEST[$1]=$(newest "$1"); fi
  echo "${NEWEST[$1]}"
}

# row name -> pip requirement arguments (one line, space separated; "-c FILE" allowed)
row_spec() {
  case "$1" in
    newest-installable) echo "(resolved by pip at run time)" ;;
    oldest) echo "transformers==$OLDEST_TRANSFORMERS peft==$OLDEST_PEFT accelerate==$OLDEST_ACCELERATE" ;;
    middle) echo "transformers==$MIDDLE_TRANSFORMERS $(pin_newest peft) $(pin_newest accelerate)" ;;
    newest) echo "$(pin_newest transformers) $(pin_newest peft) $(pin_newest accelerate)" ;;
    pinned) echo "-c $SRC/constraints/ci.txt" ;;
    [0-9]*.*) echo "transformers==$1 $(pin_newest peft) $(pin_newest accelerate)" ;;
    *==*)  # pkg==ver[+pkg==ver...]; peft / accelerate not named: the newest
      local reqs=${1//+/ } extra=""
      case " $reqs" in *" peft=="*) ;; *) extra="$extra $(pin_newest peft)" ;; esac
      case " $reqs" in *" accelerate=="*) ;; *) extra="$extra $(pin_newest accelerate)" ;; esac
      echo "$reqs$extra" ;;
    *) return 1 ;;
  esac
}
pin_newest() {
  local v; v=$(newest_cached "$1")
  if [ -n "$v" ]; then echo "$1==$v"; else echo "$1"; fi
}

# requirement arguments -> a venv folder name
venv_key() {
  local key; key=$(echo "$TORCH_SPEC $*" | tr ' ' '\n' | grep -v '^-c$' | grep -v '/' | sed 's/==/-/g; s/[^A-Za-z0-9.-]/-/g' | tr '\n' '_')
  case "$*" in *"-c "*) key="${key}c$(sha256sum "$SRC/constraints/ci.txt" | cut -c1-8)" ;; esac
  echo "${key%_}"
}

IFS=, read -r -a ROW_LIST <<< "$ROWS"
for row in "${ROW_LIST[@]}"; do
  if ! row_spec "$row" > /dev/null; then echo "compat_matrix: unknown row '$row'" >&2; usage >&2; exit 2; fi
done

TESTS=()
if [ -n "${COMPAT_TESTS:-}" ]; then
  read -r -a TESTS <<< "$COMPAT_TESTS"
else
  for t in tests/test_generation.py tests/test_prefix_tuning.py tests/test_prompt_learning.py \
           tests/test_interop.py tests/test_accelerate.py tests/test_lora.py tests/test_ia3.py; do
    [ -f "$SRC/$t" ] && TESTS+=("$t")
  done
fi

if [ "$LIST" = 1 ]; then
  for row in "${ROW_LIST[@]}"; do printf '%-8s %s %s\n' "$row" "$TORCH_SPEC" "$(row_spec "$row")"; done
  exit 0
fi

mkdir -p "$VENV_DIR"
LOG_DIR="$VENV_DIR/logs"
mkdir -p "$LOG_DIR"
echo "compat_matrix: checkout $SRC, tests: ${TESTS[*]}"
echo "compat_matrix: venvs under $VENV_DIR, logs under $LOG_DIR"

# make (or reuse) the venv for a requirement set; prints its path, returns non-zero on failure
ensure_venv() {
  local reqs=$1 ilog=$2 key venv marker want
  key=$(venv_key $reqs)
  venv="$VENV_DIR/$key"
  marker="$venv/.compat-installed"
  want="$TORCH_SPEC $reqs | $SRC"
  if [ "$FRESH" = 1 ] || [ ! -x "$venv/bin/python" ]; then
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv" || return 1
  fi
  if [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ]; then echo "$venv"; return 0; fi
  rm -f "$marker"
  {
    "$venv/bin/python" -m pip install -q "$TORCH_SPEC" "setuptools>=77" "pybind11>=2.12" &&
    # editable: tests this checkout as it is; no nvcc build (the subset needs no fastpeft._C)
    FASTPEFT_SKIP_CUDA=1 "$venv/bin/python" -m pip install -q --no-build-isolation \
      -e "$SRC[test,bench]" "$TORCH_SPEC" $reqs
  } > "$ilog" 2>&1
  local rc=$?
  [ "$rc" -eq 0 ] || return 1
  echo "$want" > "$marker"
  echo "$venv"
}

# the newest transformers / peft / accelerate pip can actually install with $TORCH_SPEC
resolve_installable() {
  local report rc; report=$(mktemp)
  "$PYTHON" -m pip install --dry-run --ignore-installed -q --report "$report" "$TORCH_SPEC" \
    "transformers>=$OLDEST_TRANSFORMERS" "peft>=$OLDEST_PEFT" "accelerate>=$OLDEST_ACCELERATE" > /dev/null 2>&1 &&
  "$PYTHON" -c '
import json, sys
got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
print(" ".join(f"{p}=={got[p]}" for p in ("transformers", "peft", "accelerate")))' "$report"
  rc=$?; rm -f "$report"; return $rc
}

declare -a TABLE=() DETAILS=()
overall=0
CHILD=""; CURRENT=""
print_table() {
  echo
  echo "compat matrix ($(date -u '+%Y-%m-%d %H:%M UTC'); TRITON_INTERPRET=1 pytest ${TESTS[*]})"
  echo
  echo "| row | torch | transformers | peft | accelerate | passed | failed | errors | skipped | time (install + tests) | result |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  local line
  for line in "${TABLE[@]}"; do echo "$line"; done
  [ -n "$CURRENT" ] && echo "$CURRENT"
  if [ "${#DETAILS[@]}" -gt 0 ]; then
    echo
    echo "failures:"
    for line in "${DETAILS[@]}"; do echo "$line"; done
  fi
}
# stopped from outside (CI's timeout): stop the running tests, still print what was measured
on_term() {
  [ -n "$CHILD" ] && kill "$CHILD" 2> /dev/null
  print_table
  echo "compat_matrix: stopped by a signal; rows not shown did not run"
  exit 124
}
trap on_term TERM INT
i=0
while [ "$i" -lt "${#ROW_LIST[@]}" ]; do
  row=${ROW_LIST[$i]}; i=$((i + 1))
  if [ "$row" = newest-installable ]; then
    if ! reqs=$(resolve_installable); then
      TABLE+=("| $row | ${TORCH_SPEC#torch==} | pip resolves no install | | | - | - | - | - | - | INSTALL FAILED |")
      overall=1; continue
    fi
  else
    reqs=$(row_spec "$row")
  fi
  echo "compat_matrix: [$row] $TORCH_SPEC $reqs"
  name=$(echo "$row" | sed 's/==/-/g; s/[^A-Za-z0-9.,-]/_/g')
  t0=$(date +%s)
  if ! venv=$(ensure_venv "$reqs" "$LOG_DIR/$name.install.log"); then
    TABLE+=("| $row | ${TORCH_SPEC#torch==} | ${reqs// /, } | | | - | - | - | - | $(( $(date +%s) - t0 ))s | INSTALL FAILED |")
    DETAILS+=("--- [$row] pip could not install $TORCH_SPEC $reqs (log: $LOG_DIR/$name.install.log)")
    while IFS= read -r line; do DETAILS+=("    $line"); done < <(grep -E '^ERROR: (Could not find|No matching|Cannot install|ResolutionImpossible)' "$LOG_DIR/$name.install.log" | cut -c1-220 | head -5)
    overall=1
    if [ "$row" = newest ]; then ROW_LIST=("${ROW_LIST[@]:0:$i}" newest-installable "${ROW_LIST[@]:$i}"); fi
    continue
  fi
  versions=$("$venv/bin/python" - <<'EOF' 2>/dev/null
from importlib.metadata import version
print(" | ".join(version(p) for p in ("torch", "transformers", "peft", "accelerate")))
EOF
)
  xml="$LOG_DIR/$name.xml"
  log="$LOG_DIR/$name.log"
  rm -f "$xml"
  t1=$(date +%s)
  CURRENT="| $row | $versions | - | - | - | - | $((t1 - t0))s + ? | STOPPED (matrix timed out) |"
  (cd "$SRC" && TRITON_INTERPRET=1 exec timeout "$ROW_TIMEOUT" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
     -rfE --junitxml="$xml" "${TESTS[@]}") > "$log" 2>&1 &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=""; CURRENT=""
  t2=$(date +%s)
  counts=$("$venv/bin/python" - "$xml" <<'EOF' 2>/dev/null
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(n["tests"] - n["failures"] - n["errors"] - n["skipped"], n["failures"], n["errors"], n["skipped"])
EOF
)
  [ -n "$counts" ] || counts="- - - -"
  read -r passed failed errors skipped <<< "$counts"
  case $rc in
    0) result=ok ;;
    124) result="TIMEOUT (${ROW_TIMEOUT}s)"; overall=1 ;;
    5) result="no tests collected"; overall=1 ;;
    *) result="FAILED (pytest exit $rc)"; overall=1 ;;
  esac
  TABLE+=("| $row | $versions | $passed | $failed | $errors | $skipped | $((t1 - t0))s + $((t2 - t1))s | $result |")
  if [ "$rc" -ne 0 ]; then
    DETAILS+=("--- [$row] $(echo "$versions" | tr -d ' ') (log: $log)")
    while IFS= read -r line; do DETAILS+=("    $line"); done < <(grep -E '^(FAILED|ERROR) ' "$log" | cut -c1-220 | head -40)
    [ "$rc" -eq 124 ] && DETAILS+=("    (killed after ${ROW_TIMEOUT}s)")
  fi
done

print_table
exit "$overall"
