"""A person's answers as the browser app keeps them: an on-disk store under <run>/serve/ and the feedback source that
reads it.

The store is the only state of `papa.serve`; the HTTP layer and the round engine meet here, and every change is an
atomic file write, so a closed tab, a reload or a killed server loses nothing:

- `labels.json`: the answers of every submitted round, in the `feedback.source: file` format (`{"r001_000": 1, …}`;
  pair ids `r001_p000`). It is at once the run's labels file (the config says `feedback.source: file`,
  `feedback.wait: true`, so `papa.train --resume` continues a served run too) and the export a person downloads to
  replay their labels with `papa.train --set feedback.source=file --set feedback.labels_file=…`.
- `query.json`: the round the engine is asking about (round, kind, ids), written when it asks.
- `draft.json`: the current round's clicks so far, written at each click; submitting moves them into labels.json.
- `rounds/NNN/III.png`: the round's images as PNG, encoded once when the round is asked.
- `token`: the access token (mode 0600), kept so that a restarted server keeps the URL an open tab uses.

Rounds are numbered: a click or a submit names its round, and anything but the current, not yet submitted round is
refused (`Stale`, HTTP 409), so two tabs cannot submit a round twice. `WebFeedback.ask` answers the engine once the
round is submitted; until then it waits (briefly, on an event the submit sets) and returns None, the protocol's "not
yet". While it waits the policy is idle, so that is where a requested "what the model makes now" grid is drawn.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from papa import checkpoint
from papa.rounds import Query

VALUES = (1, -1, 0)   # like / dislike / skip; for pairs: first preferred / second preferred / tie


class Stale(Exception):
    """A click or submit for a round that is not the one asked now, or that was already submitted (HTTP 409)."""


class BadRequest(Exception):
    """A request the store cannot act on, with a message saying why (HTTP 400)."""


class Stopped(Exception):
    """The server is shutting down while the engine waits for answers."""


@dataclass
class Progress:
    """What the engine is doing, for the page's progress bar (in memory: it describes the live process only)."""
    phase: str = "starting"         # starting | labelling | update | evaluate | checkpoint | sampling | done | error
    done: int = 0
    total: int = 0
    since: float = field(default_factory=time.time)
    message: str = ""


def png_bytes(image: torch.Tensor) -> bytes:
    """One image in [−1, 1] (C, H, W) as a PNG (grey or RGB), at its own resolution: the page scales it up."""
    from PIL import Image
    x = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="png")
    return buf.getvalue()


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


class ServeStore:
    """The served run's answers on disk (see the module docstring). Thread-safe: the HTTP handlers and the engine's
    thread share one instance."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "serve"
        self.labels_path = self.dir / "labels.json"
        self.lock = threading.RLock()
        self.changed = threading.Event()       # set by a submit or a preview request: the waiting engine looks again
        self.progress = Progress()
        self.timings: list[dict] = []          # per round: submit → next round shown, in parts (bench/bench_serve.py)
        self.preview_wanted = False
        self.stopping = False
        self.rounds_total = 0
        self.budget_total = 0

    # ------------------------------------------------------------------ files
    def init(self) -> None:
        """Create serve/ and an empty labels file if absent (the engine's FileFeedback needs it to exist)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.labels_path.is_file():
            checkpoint.atomic_write_text(self.labels_path, "{}\n")

    def token(self) -> str:
        """The access token: the stored one, or a new random one stored with mode 0600."""
        p = self.dir / "token"
        if p.is_file():
            tok = p.read_text().strip()
            if len(tok) >= 16:
                return tok
        tok = secrets.token_urlsafe(18)
        checkpoint.atomic_write_text(p, tok + "\n")
        os.chmod(p, 0o600)
        return tok

    def labels(self) -> dict:
        """Every submitted answer (the export)."""
        with self.lock:
            return _read_json(self.labels_path, {})

    def query(self) -> dict | None:
        """The round asked now: {"round", "kind", "ids"}, or None before the first."""
        with self.lock:
            return _read_json(self.dir / "query.json", None)

    def draft(self) -> dict:
        """The current round's clicks so far: id -> value."""
        with self.lock:
            q, d = self.query(), _read_json(self.dir / "draft.json", {})
            if q is None or d.get("round") != q["round"]:
                return {}
            return d.get("labels", {})

    def submitted(self, r: int) -> bool:
        with self.lock:
            q = self.query()
            return q is not None and q["round"] == r and all(i in self.labels() for i in q["ids"])

    def image_path(self, r: int, i: int) -> Path:
        return self.dir / "rounds" / f"{r:03d}" / f"{i:03d}.png"

    # ------------------------------------------------------------------ the engine's side
    def open_round(self, q: Query) -> None:
        """Record the round the engine asks about and encode its images (once; a resumed run asks the same round
        with the same images, and its draft is kept)."""
        with self.lock:
            cur = self.query()
            if cur is not None and cur["round"] == q.round and cur["ids"] == q.ids and \
                    self.image_path(q.round, len(q.images) - 1).is_file():
                return
            t0 = time.perf_counter()
            for i, img in enumerate(q.images):
                checkpoint.atomic_write_bytes(self.image_path(q.round, i), png_bytes(img))
            encode_s = time.perf_counter() - t0
            checkpoint.atomic_write_text(self.dir / "query.json", json.dumps(
                {"round": q.round, "kind": q.kind, "ids": q.ids, "images": len(q.images)}))
            if self.timings and "shown_round" not in self.timings[-1]:
                self.timings[-1].update(shown_round=q.round, encode_s=round(encode_s, 4), asked_at=time.time())

    def answers(self, q: Query) -> torch.Tensor | None:
        """The submitted answers of round q, aligned with its ids, or None."""
        with self.lock:
            labels = self.labels()
            if not all(i in labels for i in q.ids):
                return None
            return torch.tensor([float(labels[i]) for i in q.ids])

    # ------------------------------------------------------------------ the person's side
    def _current(self, r: int) -> dict:
        q = self.query()
        if q is None:
            raise Stale("no round is open yet; the first round's images are still being drawn")
        if r != q["round"]:
            raise Stale(f"round {r} is not the open round (round {q['round']} is)")
        if all(i in self.labels() for i in q["ids"]):
            raise Stale(f"round {r} was already submitted")
        return q

    def label(self, r: int, qid: str, value: int | None) -> dict:
        """Set (or, with None, clear) the answer to `qid` of round r; returns the round's draft."""
        with self.lock:
            q = self._current(r)
            if qid not in q["ids"]:
                raise BadRequest(f"'{qid}' is not a query of round {r} (its ids run {q['ids'][0]} … {q['ids'][-1]})")
            if value is not None and (type(value) is not int or value not in VALUES):
                raise BadRequest(f"value must be 1, -1, 0 or null, got {value!r}")
            labels = self.draft()
            if value is None:
                labels.pop(qid, None)
            else:
                labels[qid] = value
            checkpoint.atomic_write_text(self.dir / "draft.json", json.dumps({"round": r, "labels": labels}))
            return labels

    def submit(self, r: int) -> dict:
        """Move round r's draft into labels.json (all its ids must be answered; skip is an answer)."""
        with self.lock:
            q = self._current(r)
            draft = self.draft()
            missing = [i for i in q["ids"] if i not in draft]
            if missing:
                raise BadRequest(f"{len(missing)} of round {r}'s {len(q['ids'])} {'pairs' if q['kind'] == 'pair' else 'images'} "
                                 f"have no answer yet ({', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}); "
                                 "answer each (skip counts)")
            labels = self.labels()
            labels.update({i: draft[i] for i in q["ids"]})
            checkpoint.atomic_write_text(self.labels_path, json.dumps(labels, indent=1, sort_keys=True) + "\n")
            self.timings.append({"round": r, "submitted_at": time.time()})
            self.progress = Progress("update", message="updating the model on your answers")
            self.changed.set()
            return {i: draft[i] for i in q["ids"]}

    def history(self) -> list[dict]:
        """Per submitted round: the counts of like / dislike / skip (pairs: first / second / tie)."""
        rows: dict[int, dict] = {}
        for k, v in self.labels().items():
            try:
                r = int(k[1:4])
            except ValueError:
                continue
            row = rows.setdefault(r, {"round": r, "like": 0, "dislike": 0, "skip": 0})
            row[{1: "like", -1: "dislike", 0: "skip"}.get(v, "skip")] += 1
        out = []
        for r in sorted(rows):
            row = rows[r]
            n = row["like"] + row["dislike"] + row["skip"]
            row.update(n=n, liked_fraction=round(row["like"] / n, 4) if n else 0.0)
            out.append(row)
        return out

    def want_preview(self) -> None:
        with self.lock:
            self.preview_wanted = True
            self.changed.set()

    def preview_info(self) -> dict | None:
        return _read_json(self.dir / "preview.json", None)


class WebFeedback:
    """The feedback source of a served run: the person's submitted answers from the store. `ask` opens the round in
    the store, then returns its answers once submitted, else waits up to `wait_s` for a submit and returns None (the
    engine asks again after feedback.poll_seconds). `preview(n)` (set by papa.serve) draws "what the model makes
    now"; it runs here, in the engine's thread while it waits, so it never races an update."""
    kinds = ("label", "pair")

    def __init__(self, store: ServeStore, wait_s: float = 1.0,
                 preview: Callable[[int], torch.Tensor] | None = None):
        self.store, self.wait_s, self.preview = store, wait_s, preview
        self.previews = 0

    def ask(self, query: Query) -> torch.Tensor | None:
        s = self.store
        if query.kind not in self.kinds:
            raise ValueError(f"the browser app asks for labels or pair choices, not {query.kind}")
        s.open_round(query)
        deadline = time.time() + self.wait_s
        while True:
            if s.stopping:
                raise Stopped("the server is shutting down")
            answers = s.answers(query)
            if answers is not None:
                if s.timings and "answered_at" not in s.timings[-1]:
                    s.timings[-1]["answered_at"] = time.time()
                return answers
            if s.progress.phase != "labelling":
                s.progress = Progress("labelling", message=f"round {query.round}: waiting for your answers")
            if s.preview_wanted and self.preview is not None:
                self._draw_preview()
            left = deadline - time.time()
            if left <= 0:
                return None
            s.changed.wait(left)
            s.changed.clear()

    def _draw_preview(self, n: int = 16) -> None:
        s = self.store
        with s.lock:
            s.preview_wanted = False
        t0 = time.perf_counter()
        from papa.records import save_grid
        images = self.preview(n)
        self.previews += 1
        save_grid(images, s.dir / "preview.png", nrow=8)
        q = s.query() or {}
        checkpoint.atomic_write_text(s.dir / "preview.json", json.dumps(
            {"n": n, "after_round": max(0, q.get("round", 1) - 1), "seconds": round(time.perf_counter() - t0, 2),
             "count": self.previews, "at": time.time()}))


def progress_dict(p: Progress) -> dict:
    d = asdict(p)
    d["elapsed"] = round(time.time() - p.since, 1)
    return d
