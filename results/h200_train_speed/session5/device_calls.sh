#!/bin/bash
# Issue 19, fifth session (nvidia-h200-x2, carry [".whl", ".corpus"]). Run from the repo root:
#   call1: install the carried wheels, start one setsid chain (speed script, then the scale-out
#          selection), wait for the speed part and pack it;
#   call2 [seconds]: wait for the chain (at most that long) and pack what the scale-out wrote.
set -u
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=$(pwd)
SPEED="125m_dense_r1 125m_tree_r1 125m_dense_plain_r1 125m_tree_compile_r1 125m_dense_compile_r1 syncs_tree
  125m_dense_plain_r2 125m_tree_r2 125m_dense_r2
  1.3b_dense_r1 1.3b_tree_r1 1.3b_profile_tree 1.3b_profile_dense 1.3b_tree_r2 1.3b_dense_r2
  1.3b_tree_compile_r1 1.3b_dense_compile_r1"
SCALE="opt1.3b_tree_gpu1_r3 opt1.3b_tree_fsdp2_r3 opt1.3b_tree_nostats_fsdp2_r1 opt1.3b_tree_nostats_gpu1_r1
  opt1.3b_dense_fsdp2_r1 opt1.3b_dense_gpu1_r1 opt1.3b_tree_fsdp2_nolimit_r3 opt125m_tree_gpu1_r1 opt125m_tree_ddp2_r1"
if [ "$1" = call1 ]; then
  t=$SECONDS
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/tmp/pip.log 2>&1 || tail -5 /tmp/pip.log
  echo "install $((SECONDS - t)) s"
  W=/tmp
  [ "$(df --output=avail -BG /dev/shm | tail -1 | tr -dc 0-9)" -gt 100 ] && W=/dev/shm
  echo $W > /tmp/W
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  mkdir -p $W/res
  setsid bash -c "cd $R; python3 scripts/h200_train_speed.py --out $W/res/speed --corpus .corpus --budget ${SPEED_BUDGET:-540} --only $(echo $SPEED) > $W/res/speed.log 2>&1; touch $W/res/SPEED_DONE; TMPDIR=$W python3 scripts/h200_scaleout.py --out $W/res/scaleout --corpus $R/.corpus --budget ${SCALE_BUDGET:-880} --only $(echo $SCALE) > $W/res/scaleout.log 2>&1; touch $W/res/ALL_DONE" </dev/null >/dev/null 2>&1 &
  while [ ! -e $W/res/SPEED_DONE ] && [ $SECONDS -lt 585 ]; do sleep 3; done
  part=speed
else
  W=$(cat /tmp/W)
  while [ ! -e $W/res/ALL_DONE ] && [ $SECONDS -lt ${2:-585} ]; do sleep 3; done
  part=scaleout
fi
cd $W/res
tail -25 $part.log
tar czf $OUT/$part.tgz --exclude='*.ckpt' --exclude=hf --exclude=wandb --exclude='*.safetensors' $part $part.log
ls -la $OUT
