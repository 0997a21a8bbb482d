#!/bin/bash
# Python's collections during training, without and with FrozenHeap (2-core CPU machine).
cd "$(dirname "$0")/../.."
for frozen in 0 1; do
  FROZEN=$frozen python results/host_gc/gc_pauses.py train model=opt125m tree.depth=6 data.block_size=128 \
    data.batch_size=2 trainer.max_steps=300 trainer.val_check_interval=100 trainer.limit_val_batches=2 \
    trainer.log_every_n_steps=5 hydra.run.dir=/tmp/host_gc_$frozen 2>/dev/null | grep '^{"frozen"'
done > results/host_gc/gc_pauses.jsonl
