#!/usr/bin/env bash
# The project's one entry point.
#   bash run.sh         the main job (builds .venv on first use)
#   bash run.sh test    the test suite
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv from requirements.txt (once, ~2 min)"
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
fi
export MUJOCO_GL=egl
PY=.venv/bin/python
if [ "${1:-}" = "test" ]; then
    exec $PY -m pytest -q tests
fi

# Main job: expert videos for the pipeline's tasks, plus degraded and random episodes
# used to check that a learned reward ranks experts first.
DATA=${DATA:-data}
for ENV in dmc_cartpole_balance dmc_cartpole_swingup dmc_reacher_easy; do
    echo "[videos] $ENV: scripted expert"
    $PY collect_expert_videos.py --env-id $ENV --num-episodes 22 --test-fraction 0.1 --out-dir $DATA/experts
    for EPS in 0.25 0.5 0.75 1.0; do
        echo "[videos] $ENV: epsilon $EPS (held-out degraded episodes)"
        $PY collect_expert_videos.py --env-id $ENV --num-episodes 4 --epsilon $EPS --seed 1000 \
            --test-fraction 0 --prefix "eps${EPS}_" --out-dir $DATA/degraded
    done
done
