"""Rebuild the offline lm-evaluation-harness task data in ``treeffn/evaluation/tasks``.

A maintainer script, not something an evaluation calls: the JSONL files it writes ship with
the package. Everything comes from the embedded corpora (``treeffn/data/embedded``), so the
tasks need no network. The output is deterministic (fixed seed), so rebuilding without a code
change gives byte-identical files.

    python -m treeffn.evaluation.build_tasks

Five data sets, one YAML task each (the YAML files are written by hand, next to the data):

* ``nextline_hamlet``: multiple choice. Three consecutive verse lines of a speech from Hamlet
  (the embedded corpus' held-out validation work) and four candidate next lines: the true one
  and three lines drawn from elsewhere in the play. Chance accuracy is 25%. Mostly a test of
  using the context: a word-bigram model scores at chance.
* ``completion_hamlet``: multiple choice. The same windows, but the prompt runs on into the
  first half of the fourth line and the choices are second halves of lines. Local syntax helps
  here (a word-bigram model reaches about 37% acc_norm), so small models already score above
  chance and the task separates them.
* ``nextverse_kjv``: multiple choice, out of domain. One King James verse and four candidate
  next verses from the same book.
* ``rolling_hamlet`` / ``rolling_kjv``: passages of about 2,000 characters for rolling
  (whole-document) log-likelihood: word and byte perplexity, bits per byte.

Few-shot examples come from a ``train`` split built from a different part of the same text,
never from the evaluated items.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from treeffn.data.corpus import read_documents

TASKS_DIR = Path(__file__).parent / "tasks"
SEED = 1234
CHOICES = 4
MC_TEST_ITEMS = 250
MC_TRAIN_ITEMS = 40
ROLLING_DOCS = 40
ROLLING_CHARS = 2000

# KJV: narrative books, so the next verse follows from the one before it.
KJV_TEST_BOOKS = ("Genesis", "Mark", "Acts")
KJV_TRAIN_BOOKS = ("Ruth",)
KJV_ROLLING_BOOKS = ("Ruth", "Jonah", "Mark")  # in order, until ROLLING_DOCS passages


# ---------------------------------------------------------------------------- text helpers
def hamlet_text() -> str:
    return next(d["text"] for d in read_documents("shakespeare") if d["title"] == "hamlet")


def hamlet_speeches(text: str) -> list[list[str]]:
    """Runs of consecutive speech lines of at least three words, without stage directions.

    A paragraph of the embedded text is a speaker tag line ("Ham.") followed by the speech. A
    short line ("But come;--") or a stage direction ends a run, so a line's successor in a run
    is its successor in the play.
    """
    runs = []
    for para in text.split("\n\n"):
        lines = [ln.strip() for ln in para.strip().split("\n")]
        if len(lines) < 2 or not lines[0].endswith(".") or len(lines[0].split()) > 3:
            continue  # not "<Speaker>." followed by speech (title page, stage direction, ...)
        run: list[str] = []
        for ln in lines[1:]:
            if ln.startswith("[") or len(ln.split()) < 3:
                if run:
                    runs.append(run)
                run = []
            else:
                run.append(ln)
        if run:
            runs.append(run)
    return runs


def kjv_books() -> dict[str, list[str]]:
    return {d["title"]: d["text"].split("\n") for d in read_documents("kjv")}


# ---------------------------------------------------------------------------- item builders
def next_item_windows(units: list[list[str]], context: int) -> list[tuple[list[str], str]]:
    """Non-overlapping (context lines, next line) windows inside each unit (a speech or a book)."""
    windows = []
    for lines in units:
        for start in range(0, len(lines) - context, context + 1):
            windows.append((lines[start:start + context], lines[start + context]))
    return windows


def multiple_choice_items(windows, pool: list[str], count: int, rng: random.Random) -> list[dict]:
    """``count`` items spread evenly over ``windows``; distractors drawn from ``pool``."""
    step = max(1, len(windows) // count)
    items = []
    for ctx, answer in windows[::step][:count]:
        distractors: list[str] = []
        while len(distractors) < CHOICES - 1:
            line = rng.choice(pool)
            if line != answer and line not in ctx and line not in distractors:
                distractors.append(line)
        label = rng.randrange(CHOICES)
        choices = distractors[:label] + [answer] + distractors[label:]
        items.append({"context": "\n".join(ctx), "choices": choices, "label": label})
    return items


def passages(text_lines: list[str], chars: int) -> list[str]:
    """Consecutive lines joined into passages of at least ``chars`` characters."""
    out, current = [], []
    for line in text_lines:
        current.append(line)
        if sum(len(x) + 1 for x in current) >= chars:
            out.append("\n".join(current))
            current = []
    return out


# ---------------------------------------------------------------------------- data sets
def build_nextline_hamlet(rng: random.Random) -> dict[str, list[dict]]:
    speeches = hamlet_speeches(hamlet_text())
    cut = int(len(speeches) * 0.85)  # test from the first 85% of the play, few-shot pool from the rest
    pool = [ln for sp in speeches for ln in sp]
    return {
        "test": multiple_choice_items(next_item_windows(speeches[:cut], 3), pool, MC_TEST_ITEMS, rng),
        "train": multiple_choice_items(next_item_windows(speeches[cut:], 3), pool, MC_TRAIN_ITEMS, rng),
    }


def completion_items(windows, pool: list[str], count: int, rng: random.Random) -> list[dict]:
    """Like ``multiple_choice_items``, with the answer line cut in half: the prompt ends with its
    first half, the choices are second halves (of the true line and of lines from ``pool``)."""
    def halves(line: str) -> tuple[str, str]:
        words = line.split()
        return " ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2:])

    windows = [(ctx, ans) for ctx, ans in windows if len(ans.split()) >= 4]
    tails = sorted({halves(ln)[1] for ln in pool if len(ln.split()) >= 4})
    step = max(1, len(windows) // count)
    items = []
    for ctx, answer in windows[::step][:count]:
        head, tail = halves(answer)
        distractors: list[str] = []
        while len(distractors) < CHOICES - 1:
            other = rng.choice(tails)
            if other != tail and other not in distractors:
                distractors.append(other)
        label = rng.randrange(CHOICES)
        choices = distractors[:label] + [tail] + distractors[label:]
        items.append({"context": "\n".join([*ctx, head]), "choices": choices, "label": label})
    return items


def build_completion_hamlet(rng: random.Random) -> dict[str, list[dict]]:
    speeches = hamlet_speeches(hamlet_text())
    cut = int(len(speeches) * 0.85)
    pool = [ln for sp in speeches for ln in sp]
    return {
        "test": completion_items(next_item_windows(speeches[:cut], 3), pool, MC_TEST_ITEMS, rng),
        "train": completion_items(next_item_windows(speeches[cut:], 3), pool, MC_TRAIN_ITEMS, rng),
    }


def build_nextverse_kjv(rng: random.Random) -> dict[str, list[dict]]:
    books = kjv_books()

    def split(names, count):
        items = []
        for name in names:
            items += multiple_choice_items(next_item_windows([books[name]], 1), books[name],
                                           count // len(names), rng)
        return items

    return {"test": split(KJV_TEST_BOOKS, MC_TEST_ITEMS),
            "train": split(KJV_TRAIN_BOOKS, MC_TRAIN_ITEMS)}


def build_rolling_hamlet() -> dict[str, list[dict]]:
    # Skip the title page and list of persons: start at the first scene.
    text = hamlet_text()
    body = text[text.index("Scene I."):] if "Scene I." in text else text
    docs = passages(body.split("\n"), ROLLING_CHARS)[:ROLLING_DOCS]
    return {"test": [{"title": f"hamlet-{i:03d}", "text": t} for i, t in enumerate(docs)]}


def build_rolling_kjv() -> dict[str, list[dict]]:
    books = kjv_books()
    docs = [(name, t) for name in KJV_ROLLING_BOOKS for t in passages(books[name], ROLLING_CHARS)][:ROLLING_DOCS]
    return {"test": [{"title": f"{name}-{i:03d}", "text": t} for i, (name, t) in enumerate(docs)]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows),
                    encoding="utf-8")


def main() -> None:
    rng = random.Random(SEED)
    datasets = {
        "nextline_hamlet": build_nextline_hamlet(rng),
        "nextverse_kjv": build_nextverse_kjv(rng),
        "completion_hamlet": build_completion_hamlet(rng),
        "rolling_hamlet": build_rolling_hamlet(),
        "rolling_kjv": build_rolling_kjv(),
    }
    TASKS_DIR.mkdir(exist_ok=True)
    for name, splits in datasets.items():
        for split, rows in splits.items():
            path = TASKS_DIR / f"{name}.{split}.jsonl"
            write_jsonl(path, rows)
            print(f"{path.relative_to(TASKS_DIR.parent)}: {len(rows)} rows, {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
