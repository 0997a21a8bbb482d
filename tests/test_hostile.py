"""Hostile inputs, as a table: each row is a command that must be refused before anything runs,
with exit code 2, exactly one line naming what is wrong, and every existing file byte for byte
as it was (sha256 of everything under the fixture folder before and after; nothing new).

To add a case, add a Case row: ``args`` follow ``treeffn train``; ``{root}`` is the fixture
folder (files made by ``hostile_root``), ``{readonly}`` a folder that refuses writes. Unless the
row names its own run or sweep dir, it runs with ``hydra.run.dir={root}/fresh_run``, which must
not appear.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from tests.conftest import TINY, run_cli

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]      # after `treeffn train`
    words: tuple[str, ...]     # all of them in the one error line
    exit_code: int = 2
    needs: str | None = None   # "readonly": the row needs a folder that refuses writes

    @property
    def id(self) -> str:
        return " ".join(self.args)


def case(*args: str, words: str | tuple[str, ...], **kw) -> Case:
    return Case(tuple(args), (words,) if isinstance(words, str) else tuple(words), **kw)


TOO_MANY_CPUS = len(os.sched_getaffinity(0)) + 1

CASES = [
    # presets, keys and values
    case("model=gpt7", words="model=gpt7 is not a model preset"),
    case("tree.depth=-3", words="tree.depth=-3 is not allowed"),
    case("tree.depth=1000", words="tree.depth=1000 is not allowed"),
    case("tree.trees=0", words="tree.trees=0 is not allowed"),
    case("tree.placement=diagonal", words="tree.placement='diagonal' is not allowed"),
    case("tree.activation=softmax", words="tree.activation='softmax' is not allowed"),
    case("data.block_size=100000", words="data.block_size=100000 is larger than model.max_position_embeddings"),
    case("optim.lr=-1", words="optim.lr=-1 is not allowed"),
    case("seed=-5", words=("seed=-5 is not allowed", "from 0 to 4294967295")),
    case("seed=null", words=("seed=null is not allowed", "integer")),
    case("seed=abc", words=("seed='abc' is not allowed", "integer")),
    case("trainer.val_check_interval=0", words=("trainer.val_check_interval=0 is not allowed", ">= 1")),
    case("data=files", "data.path={root}/ok.txt", "data.val_fraction=1.5",
         words=("data.val_fraction=1.5 is not allowed", "between 0 and 1")),
    # keys that do not exist, or would be ignored
    case("tree.dept=3", words="tree.dept is not a config key; did you mean tree.depth"),
    case("+tree.dept=3", words=("tree.dept is not a config key", "did you mean tree.depth")),
    case("+tree.depth=3", words=("tree.depth is already a config key", "without the +")),
    case("+sede=3", words="did you mean seed"),
    case("tree=dense", "tree.placement=post_sum", words=("tree.placement is not a setting of tree=dense",
                                                         "ignored", "tree=tree")),
    case("tree=dense", "+tree.placement=post_sum", words=("tree.placement is not a setting of tree=dense",
                                                          "ignored")),
    # memory and processes
    # (a batch no machine holds: the row must never start building; test_run_dir.py checks the tiny default)
    case("tree.depth=20", "data.batch_size=4096", "data.block_size=128",
         words=("tree.depth=20", "GiB", "training-path activations", "more than this machine's")),
    case("trainer.accelerator=cpu", f"trainer.devices={TOO_MANY_CPUS}",
         words=(f"trainer.devices={TOO_MANY_CPUS}", f"{TOO_MANY_CPUS - 1} CPU cores")),
    # sweeps: refused before multirun.yaml is written (the fixture's must stay as it is)
    case("seed=0,1", words=("seed=0,1 gives several values", "add -m")),
    case("-m", "seed=", "hydra.sweep.dir={root}/sweep", words="gives seed no value"),
    case("-m", "seed=range(0,0)", "hydra.sweep.dir={root}/sweep", words="sweeps over no values"),
    case("-m", "seed=0,abc", "hydra.sweep.dir={root}/sweep", words=("seed='abc' is not allowed", "seed=0,abc")),
    # data files
    case("data=files", "data.path={root}/missing.txt", words="no such file, folder or glob match"),
    case("data=files", "data.path={root}/empty.txt", words="empty.txt is empty"),
    case("data=files", "data.path={root}/binary.txt", words="looks binary"),
    case("data=files", "data.path={root}/latin1.txt", words="is not UTF-8 text"),
    case("data.tokenizer={root}/no_tokenizer", words="folder has no tokenizer files"),
    case("data=files", "data.path={root}/no_text.jsonl", words=("no_text.jsonl line 2 has no 'text' field",
                                                               "data.text_field", "its fields: body")),
    case("data=files", "data.path={root}/bad_line5.jsonl", words="bad_line5.jsonl line 5 is not valid JSON"),
    case("data=files", "data.path={root}/pipe.txt", words="pipe.txt: is a FIFO, not a regular file"),
    case("data=files", "data.path={root}/loop.txt", words="loop.txt: is a symbolic-link loop"),
    case("data=files", "data.path={root}/ok.txt", "data.max_train_tokens=100000000",
         words=("data.max_train_tokens=100000000 is larger than the source", "lower data.max_train_tokens")),
    case("data=tokens", "data.path={root}/prepared", "data.tokenizer={root}/other_tokenizer",
         words=("shards were made with tokenizer 'embedded'", "use the tokenizer the shards were made with")),
    case("data=tokens", "data.path={root}/truncated_prepared",
         words=("truncated_prepared/train/000000.bin: token shard has", "prepare the data again")),
    # checkpoints
    case("tree.depth=2", "resume={root}/dense_run/checkpoints/last.ckpt", words="is of another architecture"),
    case("tree=dense", "resume={root}/truncated.ckpt", words="cannot be read"),
    case("tree=dense", "resume={root}/evil.ckpt", words="cannot be read"),
    case("tree=dense", "resume={root}/nothing.ckpt", words="no such checkpoint file"),
    case("tree=dense", "resume={root}/fifo.ckpt", words=("fifo.ckpt: a FIFO (named pipe)", "not a checkpoint")),
    case("tree=dense", "resume={root}/loop.ckpt", words="loop.ckpt: a symlink loop"),
    # run dirs: someone else's, another experiment's, a newer treeffn's, unwritable ones
    case("hydra.run.dir={root}/foreign", words=("config.yaml, result.json", "which treeffn did not write",
                                                ".treeffn-run")),
    case("hydra.run.dir=", words="gives hydra.run.dir no value"),
    case("hydra.run.dir={root}/newer_run", words="written by treeffn 99.0.0, newer than this treeffn"),
    case("tree.depth=2", "hydra.run.dir={root}/dense_run", words="holds a run with different tree"),
    case("tree=dense", "+note=another", "hydra.run.dir={root}/dense_run",
         words=("holds a run with different note", "unset there")),
    case("hydra.run.dir={root}/loop_run", words="loop_run is a symlink to nothing (or a symlink loop)"),
    case("hydra.run.dir=/proc/x", words=("hydra.run.dir=/proc/x cannot be written", "/proc")),
    case("hydra.run.dir={readonly}/run", words=("cannot be written", "{readonly}"), needs="readonly"),
]


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory, cache_dir):
    """Files for the table, a finished dense run whose dir must stay intact, someone else's
    folder and an earlier sweep's multirun.yaml."""
    from tests.test_training import make_cfg
    from treeffn.training.train import train

    root = tmp_path_factory.mktemp("hostile")
    (root / "ok.txt").write_text("To be, or not to be, that is the question.\n\n" * 50)
    (root / "empty.txt").write_bytes(b"")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (root / "latin1.txt").write_bytes("d\xe9j\xe0 vu\n".encode("latin-1") * 20)
    (root / "no_tokenizer").mkdir()
    dense_run = root / "dense_run"
    train(make_cfg(cache_dir, "tree=dense", "trainer.max_steps=5"), dense_run)
    ckpt = dense_run / "checkpoints" / "last.ckpt"
    (root / "truncated.ckpt").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'PWNED'}",))

    with open(root / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    newer = root / "newer_run"
    newer.mkdir()
    (newer / "environment.json").write_text(json.dumps({"versions": {"treeffn": "99.0.0"}}))
    foreign = root / "foreign"  # issue 18, case 1: a user's own files in the folder named as run dir
    foreign.mkdir()
    (foreign / "config.yaml").write_text("mine: 1\n")
    (foreign / "result.json").write_text("{}\n")
    os.mkfifo(root / "fifo.ckpt")
    # data inputs (issue 13's bad input, issue 18's data cases)
    (root / "no_text.jsonl").write_text('{"text": "a b c"}\n{"body": "d e f"}\n')
    (root / "bad_line5.jsonl").write_text('{"text": "a"}\n' * 4 + '{"text": "e"\n')
    os.mkfifo(root / "pipe.txt")
    os.symlink(root / "loop.txt", root / "loop.txt")
    prepared_corpus(root, tmp_path_factory.mktemp("prepare-cache"))
    os.symlink(root / "loop.ckpt", root / "loop.ckpt")
    os.symlink(root / "loop_run", root / "loop_run")
    (root / "sweep").mkdir()
    (root / "sweep" / "multirun.yaml").write_text("# an earlier sweep's record\n")
    return root


def prepared_corpus(root, cache):
    """A prepared copy of ok.txt (root/prepared), the same with a shard cut short
    (root/truncated_prepared), and a tokenizer of another vocabulary (root/other_tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from treeffn.data.prepare import prepare_corpus
    from treeffn.data.tokenizer import load_tokenizer

    cfg = {"source": "files", "path": str(root / "ok.txt"), "val_path": str(root / "ok.txt"), "text_field": "text"}
    folder, _ = prepare_corpus(cfg, load_tokenizer("embedded"), cache)
    shutil.copytree(folder, root / "prepared")
    shutil.copytree(folder, root / "truncated_prepared")
    shard = root / "truncated_prepared" / "train" / "000000.bin"
    os.truncate(shard, shard.stat().st_size - 10)
    words = {"<|endoftext|>": 0, "[UNK]": 1, "To": 2, "be": 3}
    other = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=other, eos_token="<|endoftext|>").save_pretrained(root / "other_tokenizer")


@pytest.fixture(scope="module")
def readonly_dir(tmp_path_factory):
    """A folder that refuses new files: read-only permissions for a normal user; for root (whom
    permissions do not stop) a read-only tmpfs mount. None when neither is possible here."""
    folder = tmp_path_factory.mktemp("readonly")
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount = shutil.which("mount")
    if not mount or subprocess.run([mount, "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                                   capture_output=True).returncode:
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def tree_hashes(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "not a file"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("row", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused_in_one_line_and_changes_nothing(hostile_root, readonly_dir, row):
    root = hostile_root
    if row.needs == "readonly" and readonly_dir is None:
        pytest.skip("no read-only folder can be made here (root without mount permission)")
    fill = {"root": root, "readonly": readonly_dir}
    args = [a.format(**fill) for a in row.args]
    fresh = root / "fresh_run"
    own_dir = any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in args)
    before = tree_hashes(root)
    flags = [a for a in args if a.startswith("-")]  # -m goes before the overrides (Hydra's argparse)
    overrides = [a for a in args if not a.startswith("-")] + ([] if own_dir else [f"hydra.run.dir={fresh}"])
    out = run_cli(["train", *flags, *TINY, *overrides], cwd=root, timeout=180)
    assert out.returncode == row.exit_code, (out.returncode, out.stderr[-2000:])
    lines = [line for line in out.stderr.splitlines() if line.startswith("treeffn train: error:")]
    assert len(lines) == 1, out.stderr[-2000:]
    for word in row.words:
        assert word.format(**fill) in lines[0], (word, lines[0])
    assert "Traceback" not in out.stderr
    assert tree_hashes(root) == before  # nothing existing changed, nothing new written
    assert not fresh.exists()
    assert not (root / "PWNED").exists()  # loading never ran code from the checkpoint
