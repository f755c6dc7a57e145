"""Typed configuration: YAML -> nested dataclasses, validated before any work starts.

Every section is a dataclass with commented defaults. `load_config(path, overrides)` reads the YAML, applies
`section.key=value` overrides (parsed as YAML scalars), and checks every key: unknown keys, wrong types and
out-of-range values raise `ConfigError` with one line naming the key and how to fix it. Entry points turn a
`ConfigError` into exit code 2 before anything is written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; its message is one line naming the key."""


DATASETS = ("mnist", "fashion_mnist")


@dataclass
class DataConfig:
    dataset: str = "mnist"            # mnist | fashion_mnist
    root: str = ""                    # optional directory of IDX files (raw or .gz); empty: cache, then registries


@dataclass
class ModelConfig:
    arch: str = "fast"                # fast | reference (the paper's 10.2M UNet, state-dict compatible)
    im_channels: int = 1
    down_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    mid_channels: list[int] = field(default_factory=lambda: [128, 128, 64])
    down_sample: list[bool] = field(default_factory=lambda: [True, True])
    down_attention: list[bool] = field(default_factory=lambda: [False, False])  # attention in each down/up block
    time_emb_dim: int = 128
    num_down_layers: int = 1
    num_mid_layers: int = 1
    num_up_layers: int = 1
    num_heads: int = 4


@dataclass
class DiffusionConfig:
    num_timesteps: int = 1000         # T of training (and of PAPA's loss weights)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sampler: str = "ancestral"        # ancestral | ddim
    sample_steps: int = 100           # steps used when sampling; < T respaces the schedule (strided)
    eta: float = 1.0                  # DDIM eta (only for sampler: ddim)


@dataclass
class PretrainConfig:
    steps: int = 6000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    seed: int = 0


def _trained_kinds() -> tuple[str, ...]:
    from papa.negatives import TRAINED_KINDS   # imported when needed: papa.negatives imports torch
    return TRAINED_KINDS


@dataclass
class ClassifierTrainConfig:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1.0                   # Adadelta, as the PyTorch MNIST example
    gamma: float = 0.7                # StepLR per epoch
    seed: int = 1
    reject: bool = False              # add the "not a member of any class" output, trained on synthetic negatives
                                      # (papa.negatives, drawn from this seed) beside style-augmented real images
    negative_fraction: float = 0.5    # reject training: negatives per real image in each batch
    # the kinds of negative (papa.negatives.KIND_NAMES), each negative's kind drawn uniformly from this list (a kind
    # named twice is drawn twice as often); default: papa.negatives.TRAINED_KINDS (the first judges' six kinds)
    negative_kinds: list[str] = field(default_factory=lambda: list(_trained_kinds()))
    init: str = ""                    # start from this 10-class classifier file (its head gains the reject row)


@dataclass
class CheckpointsConfig:
    base: str = "checkpoints/mnist/base_ddpm.pt"
    oracle: str = "checkpoints/mnist/oracle.pt"
    evaluator: str = "checkpoints/mnist/evaluator.pt"


@dataclass
class SampleConfig:
    num: int = 100
    batch_size: int = 100
    seed: int = 0
    epapa_k: int = 0                  # steps t < k use the frozen base model (ePAPA); 0: all steps the given model
    out: str = "samples"


@dataclass
class FeedbackConfig:
    source: str = "oracle"            # oracle (simulated user) | file (labels JSON: {"<image id>": 1 | -1 | 0})
    preference: list[int] = field(default_factory=lambda: [1, 4, 7, 9])   # the user's liked classes
    full_exploitation: bool = True    # non-preferred samples labelled -1 (true) or 0 (false: ignored)
    labels_file: str = ""             # for source: file
    reject: bool = True               # oracle: an image the oracle calls "not a member of any class" (its reject
                                      # class) is disliked, like one of a class not preferred; false: the argmax-only
                                      # user, who always picks one of the classes
    flip_prob: float = 0.0            # oracle: each label or pair choice is flipped with this probability (label
                                      # noise, as people make; seeded by train.seed and the round)
    skip_below: float = 0.0           # oracle: "unsure -> skip": an image the oracle gives less than this top-class
                                      # probability is skipped (label 0; a pair with one is a tie); 0: never
    wait: bool = False                # source file: a missing label means "not yet": wait for it (a person labelling
                                      # rounds/NNN/ while the run waits) instead of stopping with an error
    poll_seconds: float = 2.0         # how often a waiting run looks for new answers


@dataclass
class TrainConfig:
    """The settings every method shares; each method's own live in its section (`papa:`, `d3po:`, … papa.algos)."""
    algo: str = "papa"                # papa (ePAPA: papa.epapa_k > 0) | d3po | diffusion_dpo | ddpo | sdpo
    rounds: int = 30
    samples_per_round: int = 10       # feedback units per round: images (papa, ddpo) or pairs (d3po, diffusion_dpo, sdpo)
    batch_size: int = 10              # units (images or pairs) per optimiser step
    epochs_per_round: int = 1         # passes over the round's training set
    lr: float = 1e-5
    lr_decay: str = "none"            # per-round learning rate: none | linear (lr·(R−r)/R in round r = 0…R−1) | cosine
    ema_decay: float = 0.0            # > 0: evaluate (and save as "ema") an EMA of the policy, updated every optimiser
                                      # step; feedback rounds still sample the live policy. 0: off
    weight_decay: float = 0.0
    grad_clip: float = 1.0            # 0: off
    timestep_chunk: int = 64          # (sample, t) items per UNet call; gradients accumulate chunk by chunk
    loss_scale: str = "global"        # global: independent of ranks | reference: DDP mean over W ranks (8-GPU scaling)
    # trajectory methods (d3po, ddpo, sdpo): the sampler whose steps are recorded and trained
    traj_steps: int = 20              # few-step sampling as in those papers
    traj_sampler: str = "ddim"        # ddim | ancestral
    traj_eta: float = 1.0             # DDIM eta (1: every step stochastic, as D3PO/DDPO/SDPO)
    seed: int = 0
    output_dir: str = "runs"
    sample_path: str = ""             # run directory name under output_dir/task_name (default: algo_seed)


@dataclass
class SelectConfig:
    """Active querying (papa.select): each round a pool of candidates, of which a selector picks the
    train.samples_per_round that the feedback source is asked about (and the label budget counts)."""
    selector: str = "none"            # none: every drawn sample is asked about | random | exploit | uncertainty |
                                      # diversity | uncertainty_diversity | exploit_diversity | thompson |
                                      # balanced
    pool_size: int = 64               # candidates drawn per round (>= train.samples_per_round)
    pool_sample_steps: int = 0        # sampling steps for the pool; 0: diffusion.sample_steps
    ensemble: int = 5                 # preference-model members (bootstrap resamples of the labels)
    l2: float = 0.1                   # their L2 penalty on standardised features
    feature_t: int = 200              # the noise step at which the frozen base UNet's bottleneck is read
    diversity_weight: float = 1.0     # uncertainty_ / exploit_diversity: weight of the distance term (each in [0, 1])
    like_share: float = 0.5           # balanced: the share of the asked images meant to be likes (Thompson picks
                                      # make up what random picks would miss)
    like_share_from: str = "answers"  # balanced: the share of likes so far from the answers to random picks, or
                                      # "model": the share of the pool the preference model calls liked
    model_min_precision: float = 0.5  # balanced: no model picks in a round after one where fewer than this share of
                                      # them were liked; 0: always
    pseudo_labels: int = 0            # > 0: after the person answers, the preference model (refitted on every answer
                                      # so far) labels up to this many of the pool's other candidates, the surest
                                      # first, and the update trains on them too; they cost no label. 0: off
    pseudo_confidence: float = 0.9    # a pseudo-like needs mean p(like) >= this, a pseudo-dislike <= 1 - this
    pseudo_weight: float = 1.0        # a pseudo-label's weight in the update, relative to a person's label


@dataclass
class AdapterConfig:
    """A low-rank adapter (LoRA, papa.adapters) on the frozen base UNet instead of training every weight."""
    rank: int = 0                     # 0: train every weight of a copy of the base (full fine-tuning)
    alpha: float = 2.0                # LoRA scale α (the update is (α / rank) · B A)
    targets: str = r".*resnet_conv_(first|second)\.\d+\.2"   # regex of the layers that get an adapter (whole name)
    init: str = ""                    # start from this adapter (an adapter run's round checkpoint, or a mixture of
                                      # prototype adapters, scripts/new_users.py) instead of from the base (B = 0)


@dataclass
class UsersConfig:
    """Many users (papa/population.py): run every user of a population file, each with their own adapter."""
    population: str = ""              # a population file (configs/users_<dataset>.yaml); empty: one user, this config
    include_new: bool = False         # also run the users marked `new` (newcomers)
    only: list[str] = field(default_factory=list)   # run only these user ids of the population (empty: all)


@dataclass
class EvalConfig:
    every: int = 5                    # evaluate every N rounds (the first and the last always)
    num: int = 200                    # samples for intermediate evaluations
    final_num: int = 500              # samples for the first and final evaluations
    real_max: int = 0                 # real preferred-class test images the FID and fidelity metrics compare with
                                      # (a fixed, seeded subset); 0: all of them
    seed: int = 12345
    batch_size: int = 250


@dataclass
class Config:
    task_name: str = "mnist"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    oracle: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
    evaluator: ClassifierTrainConfig = field(default_factory=lambda: ClassifierTrainConfig(seed=2, lr=1e-3))
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    users: UsersConfig = field(default_factory=UsersConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # each registered method's settings section, by name (`papa:`, `d3po:`, … at the top level of the YAML)
    methods: dict = field(default_factory=lambda: _default_methods())

    def method(self, name: str | None = None) -> Any:
        """The settings of method `name` (default: train.algo)."""
        return self.methods[name or self.train.algo]


def _default_methods() -> dict:
    """Every registered method's settings at their defaults (imported late: the methods import papa.config)."""
    from papa.algos import method_settings
    return {name: tp() for name, tp in method_settings().items()}


# --------------------------------------------------------------------------- building from plain data


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of its fields, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string; accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}' has an unsupported type {tp}")  # pragma: no cover


def _build_config(data: dict) -> Config:
    """The top level: the shared sections, plus one section per registered method (its Settings dataclass)."""
    from papa.algos import method_settings
    sections = method_settings()
    data = dict(data)
    if "methods" in data:
        raise ConfigError("unknown config key 'methods'; method settings are top-level sections named after the "
                          f"method: {', '.join(sorted(sections))}")
    given = {name: data.pop(name) for name in list(data) if name in sections}
    cfg = _build(Config, data, extra=sorted(sections))
    cfg.methods = {name: _coerce(given.get(name, {}), tp, name) for name, tp in sections.items()}
    return cfg


def _build(cls: type, data: dict, prefix: str = "", extra: list[str] = ()) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - ({"methods"} if cls is Config else set())
    for k in data:
        if k not in names:
            raise ConfigError(
                f"unknown config key '{prefix}{k}'; valid keys here: {', '.join(sorted(names | set(extra)))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}' {msg}")


def validate(cfg: Config) -> Config:
    """Range and consistency checks; raises ConfigError naming the key."""
    _require(cfg.data.dataset in DATASETS, "data.dataset", f"must be one of {DATASETS}, got {cfg.data.dataset!r}")
    m = cfg.model
    _require(m.arch in ("fast", "reference"), "model.arch", f"must be 'fast' or 'reference', got {m.arch!r}")
    _require(len(m.down_channels) >= 2, "model.down_channels", "needs at least two entries")
    _require(all(c > 0 and c % 8 == 0 for c in m.down_channels + m.mid_channels), "model.down_channels",
             "and model.mid_channels must be positive multiples of 8 (GroupNorm(8))")
    _require(len(m.down_sample) == len(m.down_channels) - 1, "model.down_sample",
             f"must have len(down_channels)-1 = {len(m.down_channels) - 1} entries")
    _require(len(m.down_attention) == len(m.down_channels) - 1, "model.down_attention",
             f"must have len(down_channels)-1 = {len(m.down_channels) - 1} entries")
    _require(m.mid_channels[0] == m.down_channels[-1], "model.mid_channels",
             "must start with down_channels[-1]")
    _require(m.mid_channels[-1] == m.down_channels[-2], "model.mid_channels",
             "must end with down_channels[-2] (the up path concatenates it with that skip)")
    _require(m.time_emb_dim > 0 and m.time_emb_dim % 2 == 0, "model.time_emb_dim", "must be a positive even number")
    for k in ("num_down_layers", "num_mid_layers", "num_up_layers", "num_heads", "im_channels"):
        _require(getattr(m, k) >= 1, f"model.{k}", "must be >= 1")
    dc = m.down_channels  # channels that nn.MultiheadAttention splits over num_heads: down, up and mid blocks
    attended = ([dc[i + 1] for i, a in enumerate(m.down_attention) if a] + m.mid_channels[1:]
                + [dc[i - 1] if i else 16 for i, a in enumerate(m.down_attention) if a])
    _require(all(c % m.num_heads == 0 for c in attended), "model.num_heads",
             f"must divide every attended channel count {sorted(set(attended))}, got {m.num_heads}")
    d = cfg.diffusion
    _require(d.num_timesteps >= 2, "diffusion.num_timesteps", "must be >= 2")
    _require(0 < d.beta_start < d.beta_end < 1, "diffusion.beta_start",
             "and diffusion.beta_end must satisfy 0 < beta_start < beta_end < 1")
    _require(d.sampler in ("ancestral", "ddim"), "diffusion.sampler", f"must be 'ancestral' or 'ddim', got {d.sampler!r}")
    _require(1 <= d.sample_steps <= d.num_timesteps, "diffusion.sample_steps",
             f"must be in [1, diffusion.num_timesteps={d.num_timesteps}]")
    _require(0.0 <= d.eta <= 1.0, "diffusion.eta", "must be in [0, 1]")
    p = cfg.pretrain
    for k in ("steps", "batch_size", "checkpoint_every"):
        _require(getattr(p, k) >= 1, f"pretrain.{k}", "must be >= 1")
    _require(p.lr > 0, "pretrain.lr", "must be > 0")
    _require(0.0 <= p.ema_decay < 1.0, "pretrain.ema_decay", "must be in [0, 1)")
    for sec in ("oracle", "evaluator"):
        c = getattr(cfg, sec)
        _require(c.epochs >= 1, f"{sec}.epochs", "must be >= 1")
        _require(c.batch_size >= 1, f"{sec}.batch_size", "must be >= 1")
        _require(c.lr > 0, f"{sec}.lr", "must be > 0")
        _require(0 < c.negative_fraction <= 4, f"{sec}.negative_fraction", "must be in (0, 4]")
        from papa.negatives import KIND_NAMES
        bad = [k for k in c.negative_kinds if k not in KIND_NAMES]
        _require(bool(c.negative_kinds) and not bad, f"{sec}.negative_kinds",
                 f"must be a non-empty list of {list(KIND_NAMES)}, got {bad or c.negative_kinds}")
    s = cfg.sample
    _require(s.num >= 1, "sample.num", "must be >= 1")
    _require(s.batch_size >= 1, "sample.batch_size", "must be >= 1")
    _require(0 <= s.epapa_k < d.num_timesteps, "sample.epapa_k",
             f"must be in [0, diffusion.num_timesteps={d.num_timesteps}) (k >= T would train no step)")
    f = cfg.feedback
    _require(f.source in ("oracle", "file"), "feedback.source", f"must be 'oracle' or 'file', got {f.source!r}")
    _require(len(f.preference) >= 1 and all(0 <= c <= 9 for c in f.preference) and len(set(f.preference)) == len(f.preference),
             "feedback.preference", f"must be distinct class indices in [0, 9], got {f.preference}")
    _require(f.source != "file" or bool(f.labels_file), "feedback.labels_file", "must be set when feedback.source is 'file'")
    t = cfg.train
    from papa.algos import METHODS
    _require(t.algo in METHODS, "train.algo", f"must be one of {sorted(METHODS)}, got {t.algo!r}")
    method = METHODS[t.algo]
    _require(method.feedback != "reward" or f.source == "oracle", "feedback.source",
             f"must be 'oracle' for train.algo={t.algo} (it needs a reward; label files hold choices, not rewards)")
    _require(1 <= t.traj_steps <= d.num_timesteps, "train.traj_steps", f"must be in [1, {d.num_timesteps}]")
    _require(t.traj_steps >= 2 or not method.draws.startswith("trajector"), "train.traj_steps",
             "must be >= 2 (the last step has no density)")
    _require(t.traj_sampler in ("ddim", "ancestral"), "train.traj_sampler", "must be ddim or ancestral")
    _require(0.0 < t.traj_eta <= 1.0, "train.traj_eta", "must be in (0, 1] (eta = 0 has no density to train)")
    for k in ("rounds", "samples_per_round", "batch_size", "epochs_per_round", "timestep_chunk"):
        _require(getattr(t, k) >= 1, f"train.{k}", "must be >= 1")
    _require(t.lr > 0, "train.lr", "must be > 0")
    _require(0.0 <= t.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1) (0: off)")
    _require(t.lr_decay in ("none", "linear", "cosine"), "train.lr_decay", "must be none, linear or cosine")
    _require(t.grad_clip >= 0 and t.weight_decay >= 0, "train.grad_clip", "and train.weight_decay must be >= 0")
    _require(t.loss_scale in ("global", "reference"), "train.loss_scale", "must be global or reference")
    _require(_plain_name(cfg.task_name), "task_name",
             f"must be a plain directory name (no '/', '..'), got {cfg.task_name!r}")
    _require(not t.sample_path or _plain_name(t.sample_path), "train.sample_path",
             f"must be a plain directory name under train.output_dir/task_name (no '/', '..'), got {t.sample_path!r}")
    _require(bool(t.output_dir), "train.output_dir", "must not be empty")
    _require(f.poll_seconds > 0, "feedback.poll_seconds", "must be > 0")
    _require(0.0 <= f.flip_prob <= 0.5, "feedback.flip_prob", "must be in [0, 0.5] (above 0.5 the user is inverted)")
    _require(0.0 <= f.skip_below < 1.0, "feedback.skip_below", "must be in [0, 1) (0: never skip)")
    _require(not f.wait or f.source == "file", "feedback.wait", "applies to feedback.source: file; set it to false")
    for name, settings in cfg.methods.items():  # every section is checked, the active method's and the others'
        settings.check(cfg, require=lambda cond, key, msg, name=name: _require(cond, f"{name}.{key}", msg))
    sc = cfg.select
    from papa.select import SELECTORS
    _require(sc.selector in ("none", *SELECTORS), "select.selector",
             f"must be none or one of {sorted(SELECTORS)}, got {sc.selector!r}")
    if sc.selector != "none":
        _require(method.draws == "images", "select.selector",
                 f"needs a method that draws images (papa, diffusion_kto); train.algo={t.algo} draws {method.draws}; "
                 "set select.selector: none")
        _require(sc.pool_size >= t.samples_per_round, "select.pool_size",
                 f"must be >= train.samples_per_round ({t.samples_per_round}), got {sc.pool_size}")
    _require(0 <= sc.pool_sample_steps <= d.num_timesteps, "select.pool_sample_steps",
             f"must be in [0, diffusion.num_timesteps={d.num_timesteps}] (0: diffusion.sample_steps)")
    _require(sc.ensemble >= 1, "select.ensemble", "must be >= 1")
    _require(sc.l2 > 0, "select.l2", "must be > 0")
    _require(0 <= sc.feature_t < d.num_timesteps, "select.feature_t", f"must be in [0, {d.num_timesteps})")
    _require(sc.diversity_weight >= 0, "select.diversity_weight", "must be >= 0")
    _require(0 < sc.like_share <= 1, "select.like_share", "must be in (0, 1]")
    _require(sc.like_share_from in ("answers", "model"), "select.like_share_from",
             f"must be answers or model, got {sc.like_share_from!r}")
    _require(0 <= sc.model_min_precision <= 1, "select.model_min_precision", "must be in [0, 1] (0: always trust)")
    _require(sc.pseudo_labels >= 0, "select.pseudo_labels", "must be >= 0 (0: off)")
    if sc.pseudo_labels:
        _require(sc.selector != "none", "select.pseudo_labels",
                 "labels candidates of a pool, so it needs select.selector (random, exploit, ...); set it to 0")
        _require(method.feedback == "label", "select.pseudo_labels",
                 f"needs a method that learns from one label per image (papa, diffusion_kto); train.algo={t.algo} "
                 f"asks for {method.feedback}s; set it to 0")
        _require(sc.pool_size > t.samples_per_round, "select.pool_size",
                 f"must be > train.samples_per_round ({t.samples_per_round}) for pseudo-labels to have candidates "
                 f"left, got {sc.pool_size}")
    _require(0.5 < sc.pseudo_confidence < 1.0, "select.pseudo_confidence", "must be in (0.5, 1)")
    _require(sc.pseudo_weight > 0, "select.pseudo_weight", "must be > 0")
    ac = cfg.adapter
    _require(ac.rank >= 0, "adapter.rank", "must be >= 0 (0: full fine-tuning)")
    _require(ac.alpha > 0, "adapter.alpha", "must be > 0")
    try:
        re.compile(ac.targets)
    except re.error as err:
        _require(False, "adapter.targets", f"is not a valid regular expression ({err}); e.g. '.*resnet_conv_first.*'")
    if ac.rank > 0:
        import importlib.util
        _require(importlib.util.find_spec("peft") is not None, "adapter.rank",
                 "needs the peft package (pip install -r requirements.txt, or pip install 'papa[adapters]')")
        import torch
        from papa.adapters import adaptable_layers
        from papa.models.unet import build_unet
        with torch.device("meta"):  # the layer names only: no weights, no draw from the global generator
            net = build_unet(cfg.model)
        _require(bool(adaptable_layers(net, ac.targets)), "adapter.targets",
                 f"{ac.targets!r} matches no Conv2d or Linear layer of the UNet by its whole name "
                 "(e.g. 'downs.0.resnet_conv_first.0.2'); see papa/adapters.py")
    if ac.init:
        _require(ac.rank > 0, "adapter.init", "needs adapter.rank > 0 (it is the adapter a run starts from)")
    _require(not cfg.users.only or bool(cfg.users.population), "users.only",
             "needs users.population (the population file whose users it names)")
    if cfg.users.population:
        from papa.population import check
        check(cfg)
    e = cfg.eval
    for k in ("every", "num", "final_num", "batch_size"):
        _require(getattr(e, k) >= 1, f"eval.{k}", "must be >= 1")
    _require(e.real_max == 0 or e.real_max >= 10, "eval.real_max", "must be 0 (all) or >= 10")
    return cfg


def _plain_name(name: str) -> bool:
    """A single path component: what task_name and sample_path must be, so a run stays under train.output_dir."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. sample.num=16)")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override '{text}': '{key}' is not a key; it must look like section.key (e.g. sample.num)")
    try:
        return keys, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"override '{text}': the value is not valid YAML ({first}); quote a string value, "
                          f"e.g. --set '{key}=\"{raw}\"'") from None


def read_yaml(path: str | Path, what: str = "config file", example: str = "configs/mnist.yaml") -> Any:
    """A YAML file's content, not None and not a bare scalar; any problem is a one-line ConfigError naming `what`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} '{path}' not found; pass an existing YAML such as {example}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{what} '{path}' is not a text file (not UTF-8); pass a YAML such as {example}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise ConfigError(f"{what} '{path}' cannot be read ({e.strerror})") from None
    if data is None:
        raise ConfigError(f"{what} '{path}' is empty; start from a shipped one such as {example}")
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping of sections at the top level")
    return data


def _read_yaml(path: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping; `extends: other.yaml` (a path relative to this file) is read first and this file's
    sections are merged over it, key by key."""
    p = Path(path)
    data = read_yaml(p)
    if "extends" not in data:
        return data
    parent = data.pop("extends")
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"config file '{path}': 'extends' must name another config file, got {parent!r}")
    base_path = (p.parent / parent).resolve()
    if base_path in seen or base_path == p.resolve():
        raise ConfigError(f"config file '{path}': 'extends: {parent}' makes a cycle")
    return _merge(_read_yaml(base_path, seen + (p.resolve(),)), data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (and the one it `extends`), apply `a.b=value` overrides, build the dataclasses and
    validate."""
    data: dict = _read_yaml(path) if path is not None else {}
    for ov in overrides:
        keys, value = parse_override(ov)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{ov}': '{k}' is not a section")
        node[keys[-1]] = value
    return validate(_resolve_shipped(_build_config(data)))


# The checkout that holds the shipped configs/ and checkpoints/ (papa is installed editable from it).
REPO_ROOT = Path(__file__).resolve().parent.parent


def default_config() -> Path:
    """configs/mnist.yaml of the working directory if there is one, else the shipped one."""
    here = Path("configs/mnist.yaml")
    return here if here.is_file() else REPO_ROOT / here


def _resolve_shipped(cfg: Config) -> Config:
    """Shipped checkpoint paths ('checkpoints/mnist/…') are relative to the checkout; from another working directory
    they resolve there. A path that exists from the working directory is kept as written (so the saved config, and its
    hash, do not change for runs started in the checkout)."""
    places = [(cfg.checkpoints, f.name) for f in dataclasses.fields(cfg.checkpoints)]
    places += [(cfg.oracle, "init"), (cfg.evaluator, "init"), (cfg.users, "population"), (cfg.adapter, "init")]
    for sec, name in places:
        p = Path(getattr(sec, name))
        if str(p) not in ("", ".") and not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
            setattr(sec, name, str(REPO_ROOT / p))
    return cfg


def to_dict(cfg: Any) -> dict:
    """Plain data, as the YAML reads: a Config's method sections sit at the top level after `train`."""
    if not isinstance(cfg, Config):
        return dataclasses.asdict(cfg)
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name != "methods":
            out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        if f.name == "train":
            out.update({name: dataclasses.asdict(v) for name, v in cfg.methods.items()})
    return out


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(cfg: Any) -> str:
    """A run's settings as 16 hex digits. The adapter and users sections count only when in use (adapter.rank > 0, a
    users.population), so runs made before those sections existed resume as they were."""
    data = cfg if isinstance(cfg, dict) else to_dict(cfg)
    if isinstance(data.get("adapter"), dict) and not data["adapter"].get("rank"):
        data = {k: v for k, v in data.items() if k != "adapter"}
    if isinstance(data.get("users"), dict) and not data["users"].get("population"):
        data = {k: v for k, v in data.items() if k != "users"}
    for section, key in (("users", "only"), ("adapter", "init")):   # keys added later count only when set
        if isinstance(data.get(section), dict) and not data[section].get(key) and key in data[section]:
            data = {**data, section: {k: v for k, v in data[section].items() if k != key}}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


PREFERENCE_SETS_FILE = REPO_ROOT / "configs" / "preference_sets.yaml"


def preference_sets(dataset: str) -> dict[str, tuple[list[int], str]]:
    """The preference sets a dataset's default config is judged on (configs/preference_sets.yaml): set name ->
    (liked classes, "tuned" or "held_out"), the tuned sets first."""
    spec = yaml.safe_load(PREFERENCE_SETS_FILE.read_text())
    if dataset not in spec:
        raise ValueError(f"{PREFERENCE_SETS_FILE} has no dataset {dataset!r}; it has {sorted(spec)}")
    return {name: (list(pref), group) for group in ("tuned", "held_out") for name, pref in spec[dataset][group].items()}
