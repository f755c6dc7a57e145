"""A person aligns the model in a browser: `python -m papa.serve --config configs/mnist.yaml [--port 8000]`.

Runs the online rounds of `papa.train` with the person as the feedback source. It prints a URL with a random access
token (kept in <run>/serve/token, so a restarted server keeps it), binds to 127.0.0.1 unless --host says otherwise,
and runs under torchrun like papa.train (`torchrun --nproc_per_node=N -m papa.serve …`: rank 0 serves, every rank
trains). The page (papa/web/, static HTML/JS, no build step) shows each round's images; the person likes, dislikes or
skips each (A / B / tie for pairwise methods) with the mouse or the keyboard and submits; the next round appears by
itself. `--resume RUN_DIR` continues a stopped server at the same round with the answers already given.

Several people on one server: `python -m papa.serve --config configs/mnist_users.yaml --user ann --user bo` gives
every person their own adapter on the shared base (`adapter.rank` > 0), their own round queue, run directory
(<run>/users/<name>/, a served run like any other, so `papa.sample --user NAME` samples it) and access token, and
their own page under /u/<name>/; each person's rounds go on as fast as they answer, whatever the others do.
`--resume RUN_DIR --user …` continues everyone named, and starts anyone new with the run's saved config.

The served run is an ordinary papa run whose config says `feedback.source: file`, `feedback.wait: true`, with the
labels file <run>/serve/labels.json; the answers live on disk (papa.webfeedback), never only in memory. Exit codes as
papa.train: 0 done, 2 bad input (nothing written), 3 non-finite loss.

The HTTP layer is Starlette under uvicorn, in a thread beside the engine: a few small typed handlers over the store,
every request checked for the token (header X-Papa-Token, query ?token=, or the cookie the page gets with it).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

import torch

from papa import checkpoint, dist
from papa.cli import add_config_args, add_threads_arg, apply_threads, check_writable_dir, run_main
from papa.config import Config, ConfigError, default_config, dump_yaml, load_config, to_dict, validate
from papa.engine import Engine, default_sample_path, run_dir_for
from papa.webfeedback import BadRequest, Progress, ServeStore, Stale, WebFeedback, progress_dict

WEB = Path(__file__).resolve().parent / "web"
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}   # the only static files served
PREVIEW_N = 16


# --------------------------------------------------------------------------- the run

def served_config(cfg: Config, run_dir: Path) -> Config:
    """The config of a served run: the person, through the labels file the web app writes, answers every round."""
    f = cfg.feedback
    f.source, f.labels_file, f.wait = "file", str(run_dir / "serve" / "labels.json"), True
    f.poll_seconds = min(f.poll_seconds, 0.05)  # WebFeedback waits on the submit itself; this is only the gap between
    return validate(cfg)


def check_method(cfg: Config) -> None:
    """Only methods that ask for labels or pair choices can be served: a person gives no numeric rewards."""
    from papa.algos import METHODS
    kind = METHODS[cfg.train.algo].feedback
    if kind not in WebFeedback.kinds:
        raise ConfigError(f"config key 'train.algo': {cfg.train.algo} asks for {kind}s, which a person cannot "
                          "give in the browser; use papa, d3po or diffusion_dpo")


def prepare(config: str | None, overrides: list[str], resume: str | None, force: bool = False) -> tuple[Config, Path]:
    """The served run's config and directory, validated before any work (one-line ConfigError otherwise)."""
    from papa.train import _diff
    if resume:
        saved = Path(resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml there; pass the run directory papa.serve printed")
        cfg = load_config(config or saved, overrides)
        run_dir = Path(resume)
        check_method(cfg)
        was = cfg.feedback.labels_file
        cfg = served_config(cfg, run_dir)
        if was and Path(was).resolve() == Path(cfg.feedback.labels_file).resolve():
            cfg.feedback.labels_file = was  # the same file named from another working directory: keep the saved name
        changed = _diff(to_dict(load_config(saved)), to_dict(cfg))
        if changed and not force:
            raise ConfigError(f"--resume {resume}: the config differs from the run's in {', '.join(changed)}; "
                              "rerun without those changes or pass --force")
    else:
        cfg = load_config(config or default_config(), overrides)
        check_method(cfg)
        if not cfg.train.sample_path:  # a person's run never lands in the simulated user's directory
            cfg.train.sample_path = "person_" + default_sample_path(cfg)
        run_dir = run_dir_for(cfg)
        cfg = served_config(cfg, run_dir)
        if (run_dir / "config.yaml").is_file():
            raise ConfigError(f"run directory {run_dir} already holds a run; continue it with --resume {run_dir}, "
                              "or pick another train.sample_path")
    check_writable_dir(run_dir, "run directory")
    check_models(cfg)
    return cfg, run_dir


def check_models(cfg: Config) -> None:
    """The base model and the evaluator a served run loads must be there, before anything is written."""
    for key in ("base", "evaluator"):
        p = getattr(cfg.checkpoints, key)
        if not Path(p).is_file():
            raise ConfigError(f"config key 'checkpoints.{key}': file '{p}' not found "
                              f"(ship it, or make it with python -m papa.{'pretrain' if key == 'base' else 'oracle'})")


GPU_SAMPLING = threading.Lock()
PERSON = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def prepare_people(config: str | None, overrides: list[str], resume: str | None, people: list[str],
                   force: bool = False) -> tuple[Config, Path, list[tuple[str, Config, Path]]]:
    """Several people's served runs, all checked before any work: the shared config, the run directory, and per
    person (name, their served config, <run>/users/<name>/). One-line ConfigError on bad input."""
    for name in people:
        if not PERSON.fullmatch(name):
            raise ConfigError(f"--user {name!r}: a name is letters, digits, '_', '.' or '-' (up to 64, starting "
                              "with a letter or digit), used in the page's address and the run directory")
    folded = [n.lower() for n in people]   # one directory on a case-insensitive file system
    if len(set(folded)) != len(folded):
        twice = sorted(n for n in people if folded.count(n.lower()) > 1)
        raise ConfigError(f"--user: {twice[0]!r} is named twice (names that differ only in case count as one)")
    if resume:
        root = Path(resume)
        if config:
            raise ConfigError("--resume with --user continues every person under their own saved config; drop "
                              "--config (or use --set for a change, with --force)")
        if not (root / "config.yaml").is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml there; pass the run directory papa.serve printed")
        shared = load_config(root / "config.yaml", overrides)
    else:
        shared = load_config(config or default_config(), overrides)
        if not shared.train.sample_path:
            shared.train.sample_path = "people_" + default_sample_path(shared)
        root = run_dir_for(shared)
        if (root / "config.yaml").is_file():
            raise ConfigError(f"run directory {root} already holds a run; continue it with --resume {root} "
                              f"--user …, or pick another train.sample_path")
    if shared.adapter.rank <= 0:
        raise ConfigError("--user: every person aligns their own adapter on the one shared base, so adapter.rank "
                          "must be > 0 (e.g. --config configs/mnist_users.yaml, or --set adapter.rank=2)")
    check_method(shared)
    shared.users.population, shared.users.only = "", []   # the people answer, not a simulated population
    check_writable_dir(root, "run directory")
    check_models(shared)
    out = []
    for name in people:
        udir = root / "users" / name
        if (udir / "config.yaml").is_file():
            cfg, _ = prepare(None, overrides, str(udir), force)
        else:
            cfg = served_config(copy.deepcopy(shared), udir)
        out.append((name, cfg, udir))
    return validate(shared), root, out


def people_app(served: dict[str, "Served"]):
    """One app for several people: person `name`'s own app (and token) under /u/<name>/; nothing at the root."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    async def index(req):
        return JSONResponse({"error": "this server serves several people, each at their own address: open the URL "
                                      "papa.serve printed for you (…/u/<name>/?token=…)"}, status_code=404)
    return Starlette(routes=[Route("/", index)] + [Mount(f"/u/{name}", app=s.app()) for name, s in served.items()])


def serve_people(args, host: str) -> int:
    """`--user`: several people's runs in one process, each engine in its own thread, one HTTP server."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--user serves several people from one process; start it without torchrun")
    shared, root, people = prepare_people(args.config, args.overrides, args.resume, args.user, args.force)
    sock = bind(host, args.port)
    apply_threads(args)
    _, _, device = dist.init()   # one process (world 1): the device papa.train would use
    torch.use_deterministic_algorithms(not torch.cuda.is_available(), warn_only=True)
    if not (root / "config.yaml").is_file():
        root.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(root / "config.yaml", dump_yaml(shared))
    resumed = {name: (udir / "config.yaml").is_file() for name, _, udir in people}
    served = {name: Served(cfg, udir, device=device) for name, cfg, udir in people}
    server, _ = serve_in_thread(people_app(served), sock)
    for name, s in served.items():
        print(f"papa.serve: {name}: open {url_of(sock, host, s.token, prefix=f'/u/{name}/')}", flush=True)
    print(f"papa.serve: run directory {root}; stop with Ctrl-C, continue with python -m papa.serve --resume {root} "
          + " ".join(f"--user {n}" for n in served), flush=True)
    for name, s in served.items():
        s.start(resume=resumed[name], force=args.force)
    for s in served.values():
        while s._thread.is_alive():
            s._thread.join(1.0)
    from papa.engine import NonFiniteLoss
    failed = {n: s.error for n, s in served.items() if s.error is not None}
    for name, err in failed.items():
        print(f"error: {name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
    if failed:
        return 3 if all(isinstance(e, NonFiniteLoss) for e in failed.values()) else 1
    if not args.exit_when_done:
        print("papa.serve: everyone's rounds are done; the pages still serve their history, labels and checkpoints; "
              "Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    server.should_exit = True
    return 0


class ServedEngine(Engine):
    """The round engine, telling the store what it is doing (the page's progress bar) and how long each part of
    submit → next round takes (bench/bench_serve.py). The maths is the Engine's, untouched."""
    store: ServeStore | None = None

    def _phase(self, phase: str, message: str, done: int = 0, total: int = 0) -> float:
        if self.store is not None and self.main:
            self.store.progress = Progress(phase, done, total, message=message)
        return time.perf_counter()

    def _mark(self, key: str, t0: float) -> None:
        s = self.store
        if s is not None and self.main and s.timings and "shown_round" not in s.timings[-1]:
            s.timings[-1][key] = round(s.timings[-1].get(key, 0.0) + time.perf_counter() - t0, 4)

    def _update_progress(self, phase: str, done: int, total: int) -> None:
        if self.store is not None and self.main:
            p = self.store.progress
            p.phase, p.done, p.total = phase, done, total

    def update(self, data: dict, r: int, part: dict | None = None) -> dict:
        if part is not None and not part:  # the replayed units' steps, while the person looks at the images
            return super().update(data, r, part)
        t0 = self._phase("update", f"round {r + 1}: updating the model on your answers")
        out = super().update(data, r, part)
        self._mark("update_s", t0)
        return out

    def _record_eval(self, row: dict, num: int, tag: str) -> None:
        what = "the base model, before round 1" if tag == "000" else f"the model (every {self.cfg.eval.every} rounds)"
        t0 = self._phase("evaluate", f"evaluating {what} on {num} samples")
        super()._record_eval(row, num, tag)
        self._mark("evaluate_s", t0)

    def save(self) -> Path:
        t0 = self._phase("checkpoint", "saving a checkpoint")
        out = super().save()
        self._mark("checkpoint_s", t0)
        return out

    def draw(self, r: int):
        t0 = self._phase("sampling", f"drawing round {r + 1}'s images")
        # several people's engines in one process (--user): CUDA-graph capture is not safe from two threads at once
        with GPU_SAMPLING if self.device.type == "cuda" else contextlib.nullcontext():
            out = super().draw(r)
        self._mark("sampling_s", t0)
        return out


class Served:
    """One served run: the store, the engine (rank 0 with the person as its feedback source) and the HTTP app."""

    def __init__(self, cfg: Config, run_dir: Path, rank: int = 0, world: int = 1, device=torch.device("cpu")):
        self.cfg, self.run_dir, self.rank = cfg, Path(run_dir), rank
        self.store = ServeStore(run_dir)
        if rank == 0:
            self.store.init()
        dist.barrier(world)  # every rank's FileFeedback (built by from_config, never asked) needs the labels file
        self.engine = ServedEngine.from_config(cfg, run_dir, rank, world, device)
        self.store.rounds_total = cfg.train.rounds
        self.store.budget_total = cfg.train.rounds * cfg.train.samples_per_round
        if rank == 0:
            self.engine.store = self.store
            self.engine.feedback = WebFeedback(self.store, preview=self.preview)
            self.engine.progress = self.engine._update_progress
            self.token = self.store.token()
        self.finished = False
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def preview(self, n: int) -> torch.Tensor:
        """`n` fresh images from the model as it is now (the evaluated one: the EMA when train.ema_decay > 0), with
        the rounds' sampler, drawn on rank 0 alone while the engine waits for answers."""
        from papa.sampling import sample
        e, d = self.engine, self.cfg.diffusion
        k = e.method.base_below
        return sample(e.evaluated, e.sched, n, steps=d.sample_steps, sampler=d.sampler, eta=d.eta,
                      seed=7_000_003 + int(time.time()), batch_size=n, device=e.device, progress=False,
                      base_model=e.policy.reference_module if k else None, epapa_k=k)

    def run(self, resume: bool = False, force: bool = False) -> None:
        """The rounds, in this thread. The store says 'done' once the last round is in."""
        try:
            self.engine.run(resume=resume, force=force)
            self.finished = True
            if self.rank == 0:
                self.store.progress = Progress("done", message=f"all {self.cfg.train.rounds} rounds done")
        except BaseException as e:
            self.error = e
            if self.rank == 0 and not self.store.stopping:
                self.store.progress = Progress("error", message=str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise

    # for tests and the benchmark: the rounds in a thread, the app in-process
    def start(self, resume: bool = False, force: bool = False) -> "Served":
        def target():
            try:
                self.run(resume=resume, force=force)
            except BaseException:  # noqa: BLE001 - kept in self.error for the caller
                pass
        self._thread = threading.Thread(target=target, name="papa-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 120.0) -> None:
        """Stop the engine where it waits for answers (what a killed server leaves: the draft and labels on disk)."""
        self.store.stopping = True
        self.store.changed.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def app(self):
        return create_app(self.store, self.token, self.info())

    def info(self) -> dict:
        from papa.algos import METHODS
        t = self.cfg.train
        return {"run": str(self.run_dir), "name": self.run_dir.name, "algo": t.algo, "rounds": t.rounds,
                "samples_per_round": t.samples_per_round, "kind": METHODS[t.algo].feedback,
                "finished": lambda: self.finished}


# --------------------------------------------------------------------------- HTTP

def cookie_name(token: str) -> str:
    """A cookie per server (cookies ignore the port, so two servers on one host must not share a name)."""
    return "papa_" + hashlib.sha256(token.encode()).hexdigest()[:10]


def create_app(store: ServeStore, token: str, info: dict):
    """The Starlette app over `store`: the page, its static files, the run's images and the JSON API."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Route

    cookie = cookie_name(token)
    no_store = {"Cache-Control": "no-store"}

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=no_store)

    class TokenGate:
        """Every request carries the token: 401 without one, 403 with a wrong one (compared in constant time)."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            req = Request(scope)
            given = req.headers.get("x-papa-token") or req.query_params.get("token") or req.cookies.get(cookie)
            if not given:
                return await error(401, "this server needs its access token: open the URL papa.serve printed "
                                        "(…/?token=…)")(scope, receive, send)
            if not secrets_equal(given, token):
                return await error(403, "wrong access token: open the URL papa.serve printed")(scope, receive, send)
            return await self.app(scope, receive, send)

    async def body(req: Request) -> dict:
        try:
            data = json.loads(await req.body() or b"null")
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body must be JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object")
        return data

    def int_field(data: dict, key: str) -> int:
        v = data.get(key)
        if type(v) is not int:
            raise BadRequest(f"field '{key}' must be an integer, got {v!r}")
        return v

    def handled(fn):
        async def endpoint(req: Request):
            try:
                return await fn(req)
            except Stale as e:
                return error(409, f"{e}; reload the current round")
            except BadRequest as e:
                return error(400, str(e))
        return endpoint

    async def index(req: Request) -> Response:
        html = (WEB / "index.html").read_text(encoding="utf-8")
        resp = Response(html, media_type="text/html", headers=no_store)
        resp.set_cookie(cookie, token, httponly=True, samesite="strict")
        return resp

    async def static(req: Request) -> Response:
        name = req.path_params["name"]
        if name not in STATIC:
            return error(404, f"no static file '{name}'")
        return FileResponse(WEB / name, media_type=STATIC[name], headers=no_store)

    async def state(req: Request) -> JSONResponse:
        q = store.query()
        hist = store.history()
        labels_used = sum(h["n"] for h in hist)
        finished = info["finished"]()
        if finished:
            status = "done"
        elif q is not None and not store.submitted(q["round"]):
            status = "labelling"
        else:
            status = "working"
        newest = checkpoint.round_files(store.run_dir / "checkpoints")
        return JSONResponse({
            "status": status, "run": info["name"], "algo": info["algo"], "kind": info["kind"],
            "rounds": info["rounds"], "samples_per_round": info["samples_per_round"],
            "round": q["round"] if q else 0, "ids": q["ids"] if q else [], "images": q["images"] if q else 0,
            "draft": store.draft() if status == "labelling" else {},
            "progress": progress_dict(store.progress),
            "history": hist, "budget": {"used": labels_used, "total": store.budget_total},
            "preview": store.preview_info(), "preview_pending": store.preview_wanted,
            "checkpoint": newest[-1][1].name if newest else None,
            "timings": store.timings[-1] if store.timings else None,
        }, headers=no_store)

    async def label(req: Request) -> JSONResponse:
        data = await body(req)
        r, qid, value = int_field(data, "round"), data.get("id"), data.get("value")
        if not isinstance(qid, str):
            raise BadRequest(f"field 'id' must be a query id such as 'r001_000', got {qid!r}")
        return JSONResponse({"round": r, "draft": store.label(r, qid, value)}, headers=no_store)

    async def submit(req: Request) -> JSONResponse:
        data = await body(req)
        r = int_field(data, "round")
        return JSONResponse({"round": r, "submitted": store.submit(r)}, headers=no_store)

    async def image(req: Request) -> Response:
        r, i = req.path_params["round"], req.path_params["index"]
        p = store.image_path(r, i)
        if not p.is_file():
            return error(404, f"no image {i} in round {r}")
        return FileResponse(p, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    async def grid(req: Request) -> Response:
        r = req.path_params["round"]
        p = store.run_dir / "rounds" / f"{r:03d}" / "grid.png"
        if not p.is_file():
            return error(404, f"no grid for round {r}")
        return FileResponse(p, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    async def export(req: Request) -> Response:
        text = json.dumps(store.labels(), indent=1, sort_keys=True) + "\n"
        return Response(text, media_type="application/json", headers={
            **no_store, "Content-Disposition": f'attachment; filename="labels_{info["name"]}.json"'})

    async def ckpt(req: Request) -> Response:
        files = checkpoint.round_files(store.run_dir / "checkpoints")
        if not files:
            return error(404, "no checkpoint yet: the first one is written when round 1's update is done")
        path = files[-1][1]
        return FileResponse(path, media_type="application/octet-stream", filename=f"{info['name']}_{path.name}",
                            headers=no_store)

    async def preview_request(req: Request) -> JSONResponse:
        store.want_preview()
        return JSONResponse({"pending": True}, status_code=202, headers=no_store)

    async def preview_png(req: Request) -> Response:
        p = store.dir / "preview.png"
        if not p.is_file():
            return error(404, "no preview drawn yet: ask for one (POST /api/preview)")
        return FileResponse(p, media_type="image/png", headers=no_store)

    async def not_found(req: Request, exc) -> JSONResponse:
        return error(404, f"nothing at {req.url.path}")

    async def not_allowed(req: Request, exc) -> JSONResponse:
        return error(405, f"{req.method} is not allowed on {req.url.path}")

    routes = [
        Route("/", index), Route("/static/{name}", static),
        Route("/api/state", state), Route("/api/label", handled(label), methods=["POST"]),
        Route("/api/submit", handled(submit), methods=["POST"]),
        Route("/api/image/{round:int}/{index:int}.png", image), Route("/api/grid/{round:int}.png", grid),
        Route("/api/labels.json", export), Route("/api/checkpoint", ckpt),
        Route("/api/preview", preview_request, methods=["POST"]), Route("/api/preview.png", preview_png),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})
    return TokenGate(app)


def secrets_equal(a: str, b: str) -> bool:
    import hmac
    return hmac.compare_digest(a.encode(), b.encode())


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any work so a taken port fails in one line (port 0: a free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: without it each response after a connection's first waited ~40 ms for the
    # client's delayed ACK (Nagle; measured 44 ms a request on keep-alive connections)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); pick another port "
                          "(--port 0 picks a free one)") from None
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def serve_in_thread(app, sock: socket.socket):
    """uvicorn on `sock` in a daemon thread (it installs no signal handlers there: Ctrl-C reaches the engine)."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="papa-http", daemon=True)
    thread.start()
    return server, thread


def url_of(sock: socket.socket, host: str, token: str, prefix: str = "/") -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{prefix}?token={token}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m papa.serve", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_config_args(ap, default=None)
    ap.add_argument("--resume", metavar="RUN_DIR", default=None,
                    help="continue a served run from its directory, at the round it stopped in, with the answers "
                         "already given (uses its config.yaml unless --config)")
    ap.add_argument("--force", action="store_true", help="resume even though the config changed")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one)")
    ap.add_argument("--exit-when-done", action="store_true",
                    help="exit after the last round instead of serving the finished run until Ctrl-C")
    ap.add_argument("--user", action="append", default=[], metavar="NAME",
                    help="serve this person their own adapter, rounds and page (/u/NAME/); repeat for several people "
                         "on one server (needs adapter.rank > 0, e.g. --config configs/mnist_users.yaml)")
    add_threads_arg(ap, "torch CPU threads per process (0: torch's default)")
    args = ap.parse_args(argv)
    if args.user:
        return serve_people(args, args.host)

    cfg, run_dir = prepare(args.config, args.overrides, args.resume, args.force)
    sock = bind(args.host, args.port) if dist.env_rank() == 0 else None
    apply_threads(args)
    rank, world, device = dist.init()
    torch.use_deterministic_algorithms(not torch.cuda.is_available(), warn_only=True)  # as papa.train: replayable
    ok = False
    try:
        served = Served(cfg, run_dir, rank, world, device)
        server = None
        if rank == 0:
            server, _ = serve_in_thread(served.app(), sock)
            print(f"papa.serve: open {url_of(sock, args.host, served.token)}", flush=True)
            print(f"papa.serve: run directory {run_dir}; stop with Ctrl-C, continue with "
                  f"python -m papa.serve --resume {run_dir}", flush=True)
        from papa.engine import NonFiniteLoss
        try:
            served.run(resume=bool(args.resume), force=args.force)
        except NonFiniteLoss as e:
            if rank == 0:
                print(f"error: {e}; the round was abandoned and the last good checkpoint kept; lower train.lr",
                      file=sys.stderr)
            return 3
        ok = True
        dist.teardown(world, ok)
        if rank == 0 and not args.exit_when_done:
            print(f"papa.serve: all {cfg.train.rounds} rounds done; the page still serves the history, the labels "
                  "and the checkpoint; Ctrl-C to stop", flush=True)
            while True:
                time.sleep(3600)
        if server is not None:
            server.should_exit = True
        return 0
    finally:
        if not ok:
            dist.teardown(world, ok)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_MININTERVAL", "1")
    run_main(main)
