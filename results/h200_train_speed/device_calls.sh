#!/bin/bash
# Issue 19 device calls. call1: install, start the chain, wait for the speed part.
set -u
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=$(pwd)
if [ "$1" = call1 ]; then
  t=$SECONDS
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/tmp/pip.log 2>&1 || tail -5 /tmp/pip.log
  echo "install $((SECONDS - t)) s"
  W=/tmp
  [ "$(df --output=avail -BG /dev/shm | tail -1 | tr -dc 0-9)" -gt 100 ] && W=/dev/shm
  echo $W > /tmp/W
  df -h /dev/shm /tmp | cat; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  mkdir -p $W/res
  setsid bash -c "cd $R; python3 scripts/h200_train_speed.py --out $W/res/speed --corpus .corpus --budget 560 > $W/res/speed.log 2>&1; touch $W/res/SPEED_DONE; TMPDIR=$W python3 scripts/h200_scaleout.py --out $W/res/scaleout --corpus $R/.corpus --budget 560 > $W/res/scaleout.log 2>&1; touch $W/res/ALL_DONE" </dev/null >/dev/null 2>&1 &
  while [ ! -e $W/res/SPEED_DONE ] && [ $SECONDS -lt 585 ]; do sleep 3; done
  part=speed
else
  W=$(cat /tmp/W)
  while [ ! -e $W/res/ALL_DONE ] && [ $SECONDS -lt ${2:-585} ]; do sleep 3; done
  part=scaleout
fi
cd $W/res
tail -30 $part.log
tar czf $OUT/$part.tgz --exclude='*.ckpt' --exclude=hf --exclude=wandb --exclude='*.safetensors' $part $part.log
ls -la $OUT; df -h $W | tail -1

# The four calls of 2026-11-30 (fourth session), nvidia-h200-x2, carry [".whl", ".corpus"],
# results/table6_docs/ and results/finetune_depth_docs/ moved out of the checkout for the calls:
#   1. bash results/h200_train_speed/device_calls.sh call1     -> call1_speed/ (the speed script)
#   2. bash results/h200_train_speed/device_calls.sh call2 585 -> call2_scaleout/ (the same chain)
#   3. (machine still warm)
#      TMPDIR=/dev/shm python3 scripts/h200_scaleout.py --out /dev/shm/res/scaleout3 --corpus .corpus --budget 300 \
#          --only opt125m_tree_fsdp2_kept opt125m_tree_fsdp_resumed_gpu1 opt125m_tree_gpu1_r2 opt125m_tree_ddp2_r2
#                                                               -> call3_scaleout_125m_round2/
#   4. TMPDIR=/dev/shm python3 scripts/h200_scaleout.py --out /dev/shm/res/scaleout4 --corpus .corpus --budget 285 \
#          --only opt1.3b_tree_fsdp2_r2 opt1.3b_tree_gpu1_r2     -> call4_scaleout_1.3b_round2/
# (calls 3 and 4 with the same PYTHONPATH/PATH exports as above; the script was run from the repo root then
# as ./device_call.sh, which is this file.)
