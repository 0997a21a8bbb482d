"""Several processes on CPU (gloo): the same training as one process, rank 0 alone writes.

Why the runs below must agree. Global batch s (treeffn/data/sampler.py) holds the same blocks
however it is split: 2 ranks x batch 4, 1 rank x batch 8, or 1 rank x batch 4 x 2 accumulation
steps. DDP averages the two ranks' mean-loss gradients; with equal micro-batches that is the
mean-loss gradient of the whole global batch, which is what the single process computes (up to
float summation order). The LR is constant (no warm-up, min_lr_ratio=1) so that runs of
different lengths share one schedule, and the tiny model has no dropout. The training loss of a
step is then the mean of its micro-batch losses over ranks, recorded per rank by
``record_losses``. Validation keeps the same 16 blocks in every run (limit 2 batches of 8 or 4
of 4), sharded across ranks without duplicates, so val loss and routing counts agree too.

The 2-rank run is started the way torchrun or srun start ranks (each process gets LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR/PORT); ``test_cli_sweep_starts_its_ranks`` covers Lightning starting the
second rank itself from a ``treeffn train`` command, inside a Hydra sweep.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli
from treeffn.config import ConfigError

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

# Constant LR, checkpoints and validation every 3 steps, 16 validation blocks of 32 tokens.
COMMON = ["tree.depth=2", "optim.lr=3e-3", "optim.warmup_steps=0", "optim.min_lr_ratio=1.0",
          "checkpoint.every_n_steps=3", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1"]
ONE_RANK_BATCH_8 = [*COMMON, "trainer=cpu", "data.batch_size=8", "trainer.limit_val_batches=2"]
BATCH_4 = [*COMMON, "data.batch_size=4", "trainer.limit_val_batches=4", "optim.global_batch_tokens=256"]
TWO_RANKS_BATCH_4 = [*BATCH_4, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
ONE_RANK_BATCH_4 = [*BATCH_4, "trainer=cpu"]  # global_batch_tokens=256 -> 2 accumulation steps


def make_cfg(cache_dir, *overrides):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("treeffn.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"data.cache_dir={cache_dir}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@contextlib.contextmanager
def record_losses():
    """While open, CausalLMModule appends [global_step, loss] of every micro-batch it trains on."""
    from treeffn.training.lm_module import CausalLMModule

    store: list = []
    original = CausalLMModule.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        store.append([int(self.global_step), float(loss.detach())])
        return loss

    CausalLMModule.training_step = training_step
    try:
        yield store
    finally:
        CausalLMModule.training_step = original


def step_losses(records: list) -> dict[int, float]:
    """Loss per optimizer step: the mean over its micro-batches (and ranks): all equal in size."""
    by_step: dict[int, list] = {}
    for step, loss in records:
        by_step.setdefault(step, []).append(loss)
    return {s: sum(v) / len(v) for s, v in sorted(by_step.items())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(cfg: dict, run_dir: Path, tmp: Path, world: int = 2) -> list[dict]:
    """Start ``world`` processes as torchrun/srun would; each trains and reports what it saw."""
    cfg_file = tmp / "cfg.json"
    cfg_file.write_text(json.dumps(cfg))
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        out = tmp / f"rank{rank}.json"
        procs.append((subprocess.Popen([sys.executable, "-m", "tests.test_distributed", str(cfg_file), str(run_dir),
                                        str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True), out))
    reports = []
    for proc, out in procs:
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-3000:]
        reports.append(json.loads(out.read_text()))
    return reports


def _rank_main(cfg_file: str, run_dir: str, out: str) -> None:
    """One rank of ``launch_ranks``."""
    from treeffn.training.train import train

    with record_losses() as losses:
        result = train(json.loads(Path(cfg_file).read_text()), Path(run_dir))
    Path(out).write_text(json.dumps({"losses": losses, "result": result}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """The reference (1 rank x batch 8, 9 steps), the 2-rank run (6 steps) and its resume on
    1 rank (batch 4 x 2 accumulation, steps 6-8); their losses and results."""
    tmp = tmp_path_factory.mktemp("distributed")
    from treeffn.training.train import train

    # First in this process: it also packs the corpus into the cache the ranks then share.
    with record_losses() as reference:
        ref = train(make_cfg(cache_dir, *ONE_RANK_BATCH_8, "trainer.max_steps=9"), tmp / "one_rank")
    two = launch_ranks(make_cfg(cache_dir, *TWO_RANKS_BATCH_4, "trainer.max_steps=6"), tmp / "two_ranks", tmp)
    ckpt = tmp / "two_ranks" / "checkpoints" / "last.ckpt"
    with record_losses() as resumed:
        res = train(make_cfg(cache_dir, *ONE_RANK_BATCH_4, "trainer.max_steps=9", f"resume={ckpt}"), tmp / "resumed")
    return {"tmp": tmp, "ref": ref, "ref_losses": step_losses(reference), "two": two,
            "two_losses": step_losses([r for rank in two for r in rank["losses"]]),
            "resumed": res, "resumed_losses": step_losses(resumed)}


def test_two_ranks_train_like_one_rank_with_the_double_batch(runs):
    ref, two = runs["ref_losses"], runs["two_losses"]
    assert sorted(two) == list(range(6)) and sorted(ref) == list(range(9))
    for step in range(6):
        assert two[step] == pytest.approx(ref[step], rel=2e-5, abs=2e-5), (step, two, ref)
    assert ref[5] < ref[0] - 0.3  # it trained: the comparison is not between flat lines
    result = runs["two"][0]["result"]
    assert result["steps"] == 6 and result["tokens_seen"] == 6 * 8 * 32
    # The same 16 validation blocks, each evaluated once, token-weighted over both ranks.
    val_ref = [r for r in read_metrics(runs["tmp"] / "one_rank") if r.get("val/loss")]
    val_two = [r for r in read_metrics(runs["tmp"] / "two_ranks") if r.get("val/loss")]
    assert len(val_two) == 2 and [r["step"] for r in val_two] == [r["step"] for r in val_ref[:2]]
    for a, b in zip(val_two, val_ref):
        assert float(a["val/loss"]) == pytest.approx(float(b["val/loss"]), rel=2e-5)


def test_routing_statistics_equal_the_single_process_ones(runs):
    ref_rows = {int(r["step"]): r for r in read_metrics(runs["tmp"] / "one_rank") if r.get("tree/mean/dead_frac")}
    two_rows = {int(r["step"]): r for r in read_metrics(runs["tmp"] / "two_ranks") if r.get("tree/mean/dead_frac")}
    assert len(two_rows) == 2 and set(two_rows) <= set(ref_rows)  # the validations after steps 3 and 6
    for step, row in two_rows.items():
        for key in ("tree/mean/dead_frac", "tree/mean/leaf_entropy", "tree/mean/leaves_used",
                    "tree/mean/right_frac", "tree/layer0/dead_frac", "tree/layer0/leaf_entropy"):
            assert float(row[key]) == pytest.approx(float(ref_rows[step][key]), rel=1e-6, abs=1e-9), (step, key)
    # Both ranks report the same reduced statistics.
    first, second = (rank["result"]["routing"]["mean"] for rank in runs["two"])
    assert first == second


def test_a_two_rank_checkpoint_resumes_on_one_rank(runs):
    ref, resumed = runs["ref_losses"], runs["resumed_losses"]
    assert sorted(resumed) == [6, 7, 8]  # data position, optimizer and step count came back
    for step in (6, 7, 8):
        assert resumed[step] == pytest.approx(ref[step], rel=2e-5, abs=2e-5), (step, resumed, ref)
    res = runs["resumed"]
    assert res["steps"] == 9 and res["tokens_seen"] == 9 * 8 * 32
    assert res["val_loss"] == pytest.approx(runs["ref"]["val_loss"], rel=2e-5)


def test_only_rank_zero_writes_the_run_dir(runs):
    run = runs["tmp"] / "two_ranks"
    for name in ("config.yaml", "environment.json", "result.json", "checkpoints/last.ckpt",
                 "logs/csv/metrics.csv"):
        assert (run / name).exists(), name
    assert not list(run.glob("logs/csv/metrics-part*.csv"))  # no rank renamed rank 0's log away
    index = [json.loads(line) for line in (run.parent / "index.jsonl").read_text().splitlines()]
    assert sum(1 for rec in index if rec["run_dir"] == str(run)) == 1  # one record, not one per rank
    saved = json.loads((run / "result.json").read_text())
    assert saved["status"] == "finished" and saved["val_loss"] == runs["two"][1]["result"]["val_loss"]


def test_a_checkpoint_of_another_global_batch_is_refused(runs, cache_dir, tmp_path):
    from treeffn.training.train import train

    ckpt = runs["tmp"] / "two_ranks" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="global_batch_tokens=256"):
        train(make_cfg(cache_dir, *ONE_RANK_BATCH_4, "optim.global_batch_tokens=512", f"resume={ckpt}"),
              tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_ranks_lightning_cannot_start_are_refused_before_anything_is_written(cache_dir, tmp_path):
    """train() called from Python (no Hydra job to re-run) cannot have Lightning start ranks."""
    from treeffn.training.train import train

    cfg = make_cfg(cache_dir, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    with pytest.raises(ConfigError, match="start every rank yourself"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_sweep_starts_its_ranks(tmp_path, cache_dir):
    """`treeffn train -m ... trainer=ddp trainer.devices=2`: Lightning starts each job's second
    rank by re-running the command; every job trains in its own run dir, on two ranks."""
    args = ["train", "-m", *TINY, *COMMON, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.max_steps=2", "data.batch_size=4", "trainer.limit_val_batches=2", "tree.placement=node,post_sum",
            f"data.cache_dir={cache_dir}", f"runs_root={tmp_path}/runs", "hydra.sweep.subdir=job${hydra:job.num}"]
    proc = run_cli(args, cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "runs" / "multirun"
    records = [json.loads(line) for line in (sweep / "index.jsonl").read_text().splitlines()]
    assert sorted(r["run_dir"] for r in records) == [str(sweep / "job0"), str(sweep / "job1")]
    for rec in records:
        assert rec["status"] == "finished" and rec["tokens_seen"] == 2 * 4 * 32 * 2  # two ranks x batch 4
    placements = [json.loads((sweep / job / "result.json").read_text())["tree"]["placement"] for job in ("job0", "job1")]
    assert placements == ["node", "post_sum"]  # each job's ranks ran that job's overrides
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["multirun"]  # no stray single-run dir
    assert proc.stdout.count("run dir:") == 2  # the second ranks print nothing


def test_global_batch_tokens_sets_accumulation():
    from treeffn.training.distributed import accumulation

    cfg = {"optim": {"global_batch_tokens": 1024}, "trainer": {"accumulate_grad_batches": 1},
           "data": {"batch_size": 4, "block_size": 32}}
    assert [accumulation(cfg, world) for world in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ConfigError, match=r"not a multiple of .* = 4 x 32 x 16 = 2048"):
        accumulation(cfg, 16)
    cfg["optim"]["global_batch_tokens"] = None
    cfg["trainer"]["accumulate_grad_batches"] = 3
    assert accumulation(cfg, 8) == 3


@pytest.mark.parametrize("override, fragment", [
    ("trainer.strategy=deepspeed", "trainer.strategy='deepspeed' is not allowed; choose one of: auto, ddp, fsdp"),
    ("trainer.num_nodes=0", "trainer.num_nodes=0 is not allowed"),
    ("trainer.devices=0", "trainer.devices=0 is not allowed"),
    ("optim.global_batch_tokens=0", "optim.global_batch_tokens=0 is not allowed"),
    ("trainer.fsdp.sharding_strategy=HALF", "trainer.fsdp.sharding_strategy='HALF' is not allowed"),
    ("trainer.fsdp.limit_all_gathers=some", "trainer.fsdp.limit_all_gathers='some' is not allowed; choose true or false"),
])
def test_scale_out_settings_are_checked(cache_dir, override, fragment):
    from treeffn.config import validate_train_config

    cfg = make_cfg(cache_dir, "trainer=fsdp" if "fsdp" in override else "trainer=ddp", override)
    with pytest.raises(ConfigError) as err:
        validate_train_config(cfg)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    both = make_cfg(cache_dir, "optim.global_batch_tokens=1024", "trainer.accumulate_grad_batches=4")
    with pytest.raises(ConfigError, match="drop trainer.accumulate_grad_batches=4"):
        validate_train_config(both)


@pytest.mark.parametrize("limit", [True, False])
def test_fsdp_strategy_takes_the_configured_settings(cache_dir, limit):
    from treeffn.models.build import build_model
    from treeffn.training.distributed import make_strategy

    cfg = make_cfg(cache_dir, "trainer=fsdp", f"trainer.fsdp.limit_all_gathers={str(limit).lower()}",
                   "trainer.fsdp.sharding_strategy=SHARD_GRAD_OP", "tree.depth=2", "model.num_hidden_layers=2")
    model = build_model(cfg["model"], cfg["tree"], vocab_size=64, pad_id=1, bos_id=0, eos_id=0)
    strategy = make_strategy(cfg["trainer"], model, "bf16-mixed")
    assert strategy.kwargs["limit_all_gathers"] is limit
    assert strategy.sharding_strategy.name == "SHARD_GRAD_OP"
    assert strategy.mixed_precision.reduce_dtype == __import__("torch").float32


def test_fsdp_on_cpus_is_refused_with_the_alternative(cache_dir):
    from treeffn.config import validate_train_config

    with pytest.raises(ConfigError, match="FSDP runs on GPUs only .on CPUs use trainer=ddp"):
        validate_train_config(make_cfg(cache_dir, "trainer=fsdp", "trainer.accelerator=cpu"))


def test_global_batches_do_not_depend_on_the_split():
    from treeffn.data.sampler import ResumableBatchSampler

    def steps(batch, accumulate, world, start=0, n=12):
        samplers = [iter(ResumableBatchSampler(100, batch, seed=3, start_step=start, accumulate=accumulate,
                                               rank=r, world_size=world)) for r in range(world)]
        return [sorted(sum((next(s) for s in samplers for _ in range(accumulate)), [])) for _ in range(n)]

    one = steps(8, 1, 1)
    assert steps(4, 1, 2) == one == steps(4, 2, 1) == steps(2, 2, 2) == steps(1, 4, 2)
    assert steps(4, 1, 2, start=5, n=7) == one[5:]  # resuming at step 5, on another split
    epoch = [b for step in one[:12] for b in step]  # 100 // 8 = 12 steps per epoch
    assert len(set(epoch)) == len(epoch)  # no block twice in an epoch


def test_validation_shards_cover_every_block_once():
    from treeffn.data.sampler import ShardedEvalBatches, limited_blocks

    for blocks, batch, world in [(16, 4, 2), (17, 4, 2), (5, 8, 4), (3, 2, 4), (100, 8, 3), (1, 1, 2)]:
        shards = [list(ShardedEvalBatches(blocks, batch, r, world)) for r in range(world)]
        assert len({len(s) for s in shards}) == 1  # the same number of batches on every rank
        assert all(0 < len(b) <= batch for s in shards for b in s)
        seen = sorted(i for s in shards for b in s for i in b)
        if ShardedEvalBatches(blocks, batch, 0, world).replicated:  # fewer blocks than ranks
            assert seen == sorted(list(range(blocks)) * world)
        else:
            assert seen == list(range(blocks))
    assert limited_blocks(100, 8, 4) == 32 and limited_blocks(100, 8, 0.5) == 48 and limited_blocks(10, 8, 9) == 10
    assert limited_blocks(100, 8, None) == 100


def test_fsdp_units_are_the_decoder_layers(cache_dir):
    """The FSDP wrapping policy on the tiny tree OPT, with torch's FSDP in one CPU process
    (Lightning allows FSDP on GPUs only): each OPTDecoderLayer is a unit with its tree layer
    inside, routing counters stay integer and unsharded, and training steps run."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from treeffn.models.build import build_model
    from treeffn.models.swap import tree_layers
    from treeffn.training.distributed import fsdp_units

    cfg = make_cfg(cache_dir, "tree.depth=2", "model.num_hidden_layers=2")
    model = build_model(cfg["model"], cfg["tree"], vocab_size=64, pad_id=1, bos_id=0, eos_id=0)
    units = fsdp_units(model)
    assert {c.__name__ for c in units} == {"OPTDecoderLayer"}
    store = dist.TCPStore("127.0.0.1", free_port(), 1, True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy(units), use_orig_params=True,
                       device_id=torch.device("cpu"))
        inner = [m for m in wrapped.modules() if isinstance(m, FSDP)][1:]  # [0] is the root
        assert [type(m.module).__name__ for m in inner] == ["OPTDecoderLayer", "OPTDecoderLayer"]
        assert all(len(tree_layers(m.module)) == 1 for m in inner)
        ids = torch.randint(0, 64, (2, 16))
        wrapped(input_ids=ids, labels=ids).loss.backward()
        visits = [layer.node_visits for layer in tree_layers(wrapped)]
        assert all(v.dtype == torch.long and int(v[0]) == 2 * 16 for v in visits)  # every token passes the root
    finally:
        dist.destroy_process_group()


def test_gradient_clipping_under_fsdp_uses_the_global_norm(cache_dir):
    """Lightning's FSDP precision plugin refuses clipping by norm (seen on two H200s), so
    CausalLMModule clips through FSDP's own clip_grad_norm_. Checked here with torch's FSDP in one
    CPU process (Lightning runs FSDP on GPUs only, so the trainer is a stand-in holding the
    wrapped model): the clipped gradients equal those of the unwrapped model clipped by
    torch.nn.utils.clip_grad_norm_, in float64."""
    import copy
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from treeffn.models.build import build_model
    from treeffn.training.distributed import fsdp_units
    from treeffn.training.lm_module import CausalLMModule, unwrapped_name

    cfg = make_cfg(cache_dir, "tree.depth=2", "model.num_hidden_layers=2", "model.dropout=0")
    model = build_model(cfg["model"], cfg["tree"], vocab_size=64, pad_id=1, bos_id=0, eos_id=0).double()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 16))
    reference(input_ids=ids, labels=ids).loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf"))
    max_norm = float(norm) / 3  # clipping must act
    torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    store = dist.TCPStore("127.0.0.1", free_port(), 1, True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy(fsdp_units(model)), use_orig_params=True,
                       device_id=torch.device("cpu"))
        wrapped(input_ids=ids, labels=ids).loss.backward()
        module = CausalLMModule(model, cfg["optim"], max_steps=10)
        module._trainer = SimpleNamespace(strategy=SimpleNamespace(model=wrapped))
        module.configure_gradient_clipping(None, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
        with FSDP.summon_full_params(wrapped, with_grads=True):
            clipped = {unwrapped_name(name): param for name, param in wrapped.named_parameters()}
            for name, param in reference.named_parameters():
                torch.testing.assert_close(clipped[name].grad, param.grad, rtol=1e-10, atol=1e-12)
    finally:
        dist.destroy_process_group()


def read_metrics(run_dir):
    import csv

    rows = []
    for path in sorted((Path(run_dir) / "logs" / "csv").glob("metrics*.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


if __name__ == "__main__":
    _rank_main(*sys.argv[1:4])
