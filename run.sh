#!/usr/bin/env bash
# The project's one entry point.
#   bash run.sh         the whole VIPER pipeline, end to end, at a small scale (2-core CPU)
#   bash run.sh test    the test suite
# Scale knobs (environment variables): ENV, DATA, RUNS, EPISODES, VQGAN_STEPS, VIDEOGPT_STEPS, AGENT_STEPS.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv from requirements.txt (once, ~2 min)"
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
fi
export MUJOCO_GL=egl OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=.venv/bin/python
if [ "${1:-}" = "test" ]; then
    exec $PY -m pytest -q tests
fi

ENV=${ENV:-dmc_cartpole_balance}
DATA=${DATA:-data}
RUNS=${RUNS:-runs/pipeline}
EPISODES=${EPISODES:-22}
VQGAN_STEPS=${VQGAN_STEPS:-1000}
VIDEOGPT_STEPS=${VIDEOGPT_STEPS:-600}
AGENT_STEPS=${AGENT_STEPS:-6000}
PREFILL=$(( AGENT_STEPS < 5000 ? AGENT_STEPS / 2 : 2500 ))
START=$SECONDS
stage() { echo; echo "==== [$1/7] $2  ($(( (SECONDS - START) / 60 )) min elapsed)"; }

stage 1 "expert, degraded and random videos of $ENV"
$PY collect_expert_videos.py --env-id $ENV --num-episodes $EPISODES --test-fraction 0.1 --out-dir $DATA/experts
for EPS in 0.0 0.25 0.5 0.75 1.0; do  # same seeds for every epsilon: paired episodes
    $PY collect_expert_videos.py --env-id $ENV --num-episodes 4 --epsilon $EPS --seed 1000 \
        --test-fraction 0 --prefix "eps${EPS}_" --out-dir $DATA/degraded
done
$PY collect_expert_videos.py --env-id $ENV --policy random --num-episodes 4 --seed 2000 --test-fraction 0 \
    --out-dir $DATA/random

stage 2 "VQ-GAN tokenizer -> $RUNS/vqgan/vqgan.pt"
$PY train_vqgan.py --data-dir $DATA/experts --tasks $ENV --threads 1 \
    --base-channels 16 --channel-mult 1 2 4 4 --disc-channels 32 --batch-size 16 --lr 1e-3 \
    --warmup-steps 100 --dead-code-steps 50 --total-steps $VQGAN_STEPS --disc-start $(( VQGAN_STEPS * 6 / 10 )) \
    --eval-every $VQGAN_STEPS --output-dir $RUNS/vqgan

stage 3 "VideoGPT reward model -> $RUNS/videogpt/videogpt.pt"
$PY train_videogpt.py --vqgan $RUNS/vqgan/vqgan.pt --data-dir $DATA/experts --tasks $ENV --class-cond \
    --random-data-dir $DATA/random --width 128 --num-layers 4 --num-heads 4 --mlp-dim 512 --seq-len 4 \
    --frame-skip 1 --batch-size 16 --learning-rate 1e-3 --warmup-steps 100 --total-steps $VIDEOGPT_STEPS \
    --eval-every $VIDEOGPT_STEPS --eval-clips 64 --sample-every $VIDEOGPT_STEPS --output-dir $RUNS/videogpt --no-cuda

stage 4 "does the reward mean the task? (eval.py reward)"
$PY eval.py reward --reward-model $RUNS/videogpt/videogpt.pt --data-dir $DATA/experts --degraded-dir $DATA/degraded \
    --tasks $ENV --output-dir $RUNS/eval_reward --no-cuda

stage 5 "a short VIPER agent run (no task reward) -> $RUNS/agent/agent.pt"
$PY train_viper_dreamer.py --env-id $ENV --reward viper --reward-model $RUNS/videogpt/videogpt.pt --size cpu \
    --total-steps $AGENT_STEPS --prefill $PREFILL --batch-length 32 --train-ratio 32 --eval-every $AGENT_STEPS \
    --eval-episodes 2 --save-every $AGENT_STEPS --no-save-replay --output-dir $RUNS/agent

stage 6 "true task return of the agent (eval.py agent)"
$PY eval.py agent --checkpoint $RUNS/agent/agent.pt --num-episodes 3 --output-dir $RUNS/eval_agent

stage 7 "summary"
$PY - "$RUNS" "$ENV" <<'EOF'
import json, sys
runs, env = sys.argv[1], sys.argv[2]
vg = json.load(open(f"{runs}/videogpt/results.json"))
rw = json.load(open(f"{runs}/eval_reward/summary.json"))["tasks"][env]
ag = json.load(open(f"{runs}/eval_agent/summary.json"))
rows = [("held-out NLL / token (nats)", f"{vg['heldout_nll_per_token']:.3f}"),
        ("unigram entropy of codes (nats)", f"{vg['unigram_entropy']:.3f}")]
rows += [(f"mean VIPER reward, epsilon={e}", f"{m:.2f}") for e, m in rw["mean_viper_reward_by_epsilon"].items()]
rows += [("reward falls monotonically with epsilon", str(rw["monotonic_decrease"])),
         ("Spearman(VIPER return, true return)", f"{rw['spearman_viper_vs_true_return']:.3f}"),
         ("AUROC expert vs random", f"{rw['auroc_expert_vs_random']:.3f}"),
         ("VIPER agent true return", f"{ag['mean_return']:.1f} +- {ag['std_return']:.1f}")]
w = max(len(k) for k, _ in rows)
print(f"\nVIPER pipeline summary ({env})")
for k, v in rows:
    print(f"  {k:<{w}}  {v}")
EOF
echo "total wall time: $(( (SECONDS - START) / 60 )) min $(( (SECONDS - START) % 60 )) s"
