"""MetaP: per-parameter initialisation scales and AdamW learning-rate multipliers.

Llama 4 tuned its hyper-parameters on small models and transferred them with "MetaP", whose formulas
were not published. This module implements the public basis: maximal-update parametrisation (muP)
for Adam across width, depth-muP across depth, and the square-root rule across batch size. Under
`optim.parametrization = "standard"` none of it applies: the model keeps its own init and every
parameter its lr (two groups, decay and no_decay, as in trainer/optim.py).

Notation, per parameter tensor: n its fan-in (Linear (out, in): in; experts (E, in, out): in, so the
routed and shared experts' w2 have the expert hidden width as fan-in), b = optim.base_width,
w = b / n, r = model.n_layers / optim.base_depth, s = model.init_std, g = sqrt(global_batch_size /
optim.base_batch_size) (1 when base_batch_size is 0). init: a normal truncated at +-3 std.

    kind                     members                                  init std       lr multiplier
    embedding                tok_embeddings                           1 (unchanged)  g
    hidden (block input)     wq wk wv; w1 w3 of dense FFN, shared     s sqrt(w)      g w r^-1/2
                             expert and routed experts
    branch output            wo; w2 of dense FFN, shared expert       s sqrt(w)      g w r^-1
                             and routed experts                        r^-1/2
    router (block readout)   router.gate (fan-out = n_experts)         s w            g w r^-1/2
    block vectors            attention_norm, ffn_norm gains           1 (unchanged)  g r^-1/2
    final norm               norm                                     1 (unchanged)  g
    output head              output (fan-out = vocab)                 b^-1/2 w       g w
    vision matrices          patch embedding, ViT wq wk wv w1,        s sqrt(w)      g w
                             adapter w1 w2, projector
    vision branch output     ViT wo, w2                               s sqrt(w) /    g w
                                                                      sqrt(2(l+1))
    vision vectors           LayerNorms, biases, class token,         unchanged      g
                             position embedding

Weight decay: a group that decays gets optim.weight_decay / (its lr multiplier), so that each step
shrinks it by lr * weight_decay, as at the base shapes ("independent" weight decay, Wortsman et al.
2023, "Small-scale proxies for large-scale Transformer training instabilities", sec. 3.2.2);
which parameters decay is the standard rule's (matrices, not the embedding table).

Why these, and where from:
- Width (muP for Adam): Yang et al. 2022, "Tensor Programs V" (arXiv:2203.03466), Table 3, the
  form without multipliers: input weights and vectors keep a width-independent init and Adam lr;
  hidden weights init variance 1/fan_in and Adam lr 1/fan_in; output weights init variance
  1/fan_in^2 and Adam lr 1/fan_in. Our "w" is that 1/fan_in measured against the base fan-in b,
  per tensor, so layers of other widths (FFN, experts, vision tower) follow their own fan-in.
  The router reads E logits out of the width, so it is an output weight. A tensor of fixed fan-in
  (patch embedding; the projector while the adapter width stays fixed) keeps fixed values, as an
  input weight must.
- The output multiplier. muP's usual form multiplies the logits by 1/m (m the width ratio) in the
  forward. Adam's update is invariant to the scale of the gradient, so a forward multiplier a on
  a weight equals init x a and lr x a on that weight; that is the head row above (its init equals
  the standard head's, dim^-1/2, at n = b). Nothing is added to the forward: the model stays a
  plain Llama 4 and `trainer.model.hf.to_hf` exports it exactly.
- Depth (depth-muP): Yang et al. 2023, "Tensor Programs VI" (arXiv:2310.02244) and Bordelon et al.
  2023, "Depthwise hyperparameter transfer in residual networks" (arXiv:2309.16620): every
  residual branch is multiplied by L^-1/2 and, with Adam, every block parameter's lr by L^-1/2
  (Dey et al. 2025, "CompleteP", arXiv:2505.01618, Table 1 with alpha = 1/2). The branch
  multiplier is absorbed, as above, into the branch's last matrix (wo, w2): init x r^-1/2 and lr
  x r^-1/2 on top of the block's r^-1/2. The vision tower's depth is not transferred (Llama 4
  uses one ViT for every text-model size); it keeps the standard per-layer output-init scaling.
- Attention scale: muP prescribes 1/head_dim for the logits when head_dim grows. We keep
  1/sqrt(head_dim), as the released models (and HF) compute it, and scale width by the number of
  heads with head_dim fixed: the two scales then differ by a width-independent constant. (QK-norm
  layers normalise q and k after the projections, so no init or lr can absorb this factor.)
- Batch size: Malladi et al. 2022, "On the SDEs and scaling rules for adaptive gradient
  algorithms" (arXiv:2205.10287): Adam's lr scales with the square root of the batch size
  (betas and eps are left as configured).

The parametrisation's label (`Parametrization.label`) is stored in every MetaP optimizer group,
so checkpoints record it; `refuse_other_parametrization` compares it before a resume.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from trainer.config import ConfigError, OptimConfig
from trainer.model.attention import depth_scaled_std
from trainer.model.config import ModelConfig

STANDARD, METAP = "standard", "metap"


@dataclass(frozen=True)
class ParamRule:
    group: str
    """Optimizer group: one lr multiplier and one weight decay for every member."""
    fan_in: int | None
    init_std: float | None
    """Std of the truncated normal MetaP draws; None: the model's own init is kept."""
    lr_mult: float
    decay: bool


@dataclass(frozen=True)
class Parametrization:
    kind: str
    """"standard" or "metap"."""
    label: str
    """Recorded in checkpoints: "standard", or "metap(base_width=.., base_depth=.., ...)"."""
    rules: dict[str, ParamRule]
    """By parameter name (as `named_parameters` gives it, wrapper prefixes removed)."""


# (pattern, group, kind); the first full match wins. Kinds are the rows of the module docstring.
_BLOCK = r"layers\.\d+\."
_VIT = r"vision\.encoder\."
_PATTERNS = [
    (r"tok_embeddings\.weight", "embedding", "embedding"),
    (r"output\.weight", "output", "readout"),
    (r"norm\.weight", "final_norm", "vector"),
    (_BLOCK + r"(attention_norm|ffn_norm)\.weight", "block_norms", "block_vector"),
    (_BLOCK + r"attention\.w[qkv]\.weight", "attention.qkv", "hidden"),
    (_BLOCK + r"attention\.wo\.weight", "attention.out", "branch_out"),
    (_BLOCK + r"feed_forward\.w[13]\.weight", "ffn.in", "hidden"),
    (_BLOCK + r"feed_forward\.w2\.weight", "ffn.out", "branch_out"),
    (_BLOCK + r"feed_forward\.router\.gate\.weight", "router", "block_readout"),
    (_BLOCK + r"feed_forward\.experts\.w[13]_EDF", "experts.in", "hidden"),
    (_BLOCK + r"feed_forward\.experts\.w2_EFD", "experts.out", "branch_out"),
    (_BLOCK + r"feed_forward\.shared_expert\.w[13]\.weight", "shared_expert.in", "hidden"),
    (_BLOCK + r"feed_forward\.shared_expert\.w2\.weight", "shared_expert.out", "branch_out"),
    (_VIT + r"patch_embedding\.weight", "vision.patch_embedding", "vision_matrix"),
    (_VIT + r"class_embedding", "vision.class_embedding", "vision_vector"),
    (_VIT + r"position_embedding", "vision.position_embedding", "vision_vector"),
    (_VIT + r"layers\.\d+\.attention\.w[qkv]\.weight", "vision.attention.qkv", "vision_matrix"),
    (_VIT + r"layers\.\d+\.attention\.wo\.weight", "vision.attention.out", "vision_branch_out"),
    (_VIT + r"layers\.\d+\.feed_forward\.w1\.weight", "vision.mlp.in", "vision_matrix"),
    (_VIT + r"layers\.\d+\.feed_forward\.w2\.weight", "vision.mlp.out", "vision_branch_out"),
    (_VIT + r".*\.bias", "vision.vectors", "vision_vector"),
    (_VIT + r"(.*norm.*)\.weight", "vision.vectors", "vision_vector"),
    (_VIT + r"adapter\.w1\.weight", "vision.adapter.in", "vision_matrix"),
    (_VIT + r"adapter\.w2\.weight", "vision.adapter.out", "vision_matrix"),
    (r"vision\.projector\.weight", "vision.projector", "vision_matrix"),
]
_NO_FAN_IN = ("embedding", "vector", "block_vector", "vision_vector")
"""Kinds whose values do not depend on a fan-in (tables and vectors)."""
_WRAPPERS = re.compile(r"(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\.")


def clean_name(name: str) -> str:
    """A parameter's name without the prefixes that wrappers (AC, compile, FSDP1) insert."""
    return _WRAPPERS.sub("", name)


def fan_in(name: str, shape: torch.Size) -> int | None:
    if len(shape) < 2:
        return None
    # Grouped experts are stored (E, in, out); Linear weights (out, in).
    return shape[1] if name.endswith(("_EDF", "_EFD")) else shape[-1]


def classify(name: str) -> tuple[str, str]:
    """(group, kind) of a parameter; an unknown name is an error, so nothing is left at SP."""
    for pattern, group, kind in _PATTERNS:
        if re.fullmatch(pattern, name):
            return group, kind
    raise ValueError(
        f"MetaP has no rule for parameter {name!r}: add its pattern to trainer/parametrization.py"
    )


def label_of(cfg: OptimConfig) -> str:
    if cfg.parametrization == STANDARD:
        return STANDARD
    return (
        f"metap(base_width={cfg.base_width}, base_depth={cfg.base_depth}, "
        f"base_batch_size={cfg.base_batch_size})"
    )


def build_parametrization(
    model: nn.Module, model_cfg: ModelConfig, cfg: OptimConfig, global_batch_size: int
) -> Parametrization:
    """The rule of every trainable parameter of `model` (any wrapping; global shapes)."""
    rules = {}
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = clean_name(raw_name)
        if cfg.parametrization == STANDARD:
            rules[name] = _standard_rule(name, param.shape)
        else:
            rules[name] = _metap_rule(name, param.shape, model_cfg, cfg, global_batch_size)
    return Parametrization(cfg.parametrization, label_of(cfg), rules)


def _decays(name: str, shape: torch.Size) -> bool:
    """The standard rule (trainer/optim.py): matrices decay, vectors and the embedding do not."""
    return len(shape) >= 2 and not name.endswith("tok_embeddings.weight")


def _standard_rule(name: str, shape: torch.Size) -> ParamRule:
    decay = _decays(name, shape)
    return ParamRule("decay" if decay else "no_decay", None, None, 1.0, decay)


def _metap_rule(
    name: str, shape: torch.Size, model_cfg: ModelConfig, cfg: OptimConfig, batch_size: int
) -> ParamRule:
    group, kind = classify(name)
    n = fan_in(name, shape) if kind not in _NO_FAN_IN else None
    w = cfg.base_width / n if n else 1.0
    branch = (model_cfg.n_layers / cfg.base_depth) ** -0.5  # r^-1/2
    s = model_cfg.init_std
    if kind == "vision_branch_out":  # the ViT's depth is not transferred: standard per layer
        layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
        std, lr = depth_scaled_std(s * math.sqrt(w), layer), w
    else:
        std, lr = {
            "embedding": (None, 1.0),
            "vector": (None, 1.0),
            "block_vector": (None, branch),
            "hidden": (s * math.sqrt(w), w * branch),
            "branch_out": (s * math.sqrt(w) * branch, w * branch * branch),
            "block_readout": (s * w, w * branch),
            "readout": (cfg.base_width**-0.5 * w, w),
            "vision_matrix": (s * math.sqrt(w), w),
            "vision_vector": (None, 1.0),
        }[kind]
    if cfg.base_batch_size:
        lr *= math.sqrt(batch_size / cfg.base_batch_size)
    return ParamRule(group, n, std, lr, _decays(name, shape))


@torch.no_grad()
def init_weights(model: nn.Module, parametrization: Parametrization) -> None:
    """Redraw every matrix that has a MetaP init scale; call after `model.init_weights()`.

    Standard: nothing happens (not even a draw from the RNG), so runs stay bit-for-bit as before.
    """
    for raw_name, param in model.named_parameters():
        rule = parametrization.rules.get(clean_name(raw_name))
        if rule is not None and rule.init_std is not None:
            std = rule.init_std
            nn.init.trunc_normal_(param, std=std, a=-3 * std, b=3 * std)


def metap_groups(
    model: nn.Module, parametrization: Parametrization, weight_decay: float
) -> list[dict]:
    """One AdamW group per (group, lr multiplier, decay); every parameter in exactly one."""
    groups: dict[tuple[str, float, bool], dict] = {}
    fan_ins: dict[tuple[str, float, bool], int | None] = {}
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        rule = parametrization.rules[clean_name(raw_name)]
        key = (rule.group, rule.lr_mult, rule.decay)
        if key not in groups:
            fan_ins[key] = rule.fan_in
            groups[key] = {
                "params": [],
                "name": rule.group,
                "lr_mult": rule.lr_mult,
                "weight_decay": weight_decay / rule.lr_mult if rule.decay else 0.0,
                "parametrization": parametrization.label,
            }
        groups[key]["params"].append(param)
    names = [group for group, _, _ in groups]
    for key, values in groups.items():
        if names.count(key[0]) > 1:  # one group name, several fan-ins: tell them apart
            values["name"] = f"{key[0]}[fan_in={fan_ins[key]}]"
    n_grouped = sum(len(g["params"]) for g in groups.values())
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert n_grouped == n_trainable, f"{n_trainable} trainable parameters, {n_grouped} grouped"
    return list(groups.values())


# --------------------------------------------------------------------------- reporting


def describe(parametrization: Parametrization, model: nn.Module, cfg: OptimConfig) -> str:
    """A table of the parameter groups: tensors, parameters, fan-in, init std, lr and decay."""
    rows: dict[str, dict] = {}
    for raw_name, param in model.named_parameters():
        name = clean_name(raw_name)
        if name not in parametrization.rules:
            continue
        rule = parametrization.rules[name]
        row = rows.setdefault(
            rule.group, {"tensors": 0, "params": 0, "fan_in": set(), "std": set(), "rule": rule}
        )
        row["tensors"] += 1
        row["params"] += param.numel()
        row["fan_in"].add(rule.fan_in)
        row["std"].add(rule.init_std)
    lines = [f"parametrization: {parametrization.label}"]
    if parametrization.kind == METAP:
        lines.append(
            f"  w = {cfg.base_width} / fan_in, depth ratio r = layers / {cfg.base_depth}; "
            "lr = optim.lr x lr_mult; decay = optim.weight_decay / lr_mult"
        )
    header = f"  {'group':<26}{'tensors':>8}{'params':>11}{'fan_in':>9}  {'init_std':<17}"
    lines.append(header + f"{'lr_mult':>10}{'decay':>8}")
    for group, row in rows.items():
        rule = row["rule"]
        fan_ins = sorted(f for f in row["fan_in"] if f is not None)
        fan = "/".join(map(str, fan_ins)) or "-"
        stds = sorted(s for s in row["std"] if s is not None)
        std = "model's" if not stds else _range(stds)
        decay = cfg.weight_decay / rule.lr_mult if rule.decay else 0.0
        lines.append(
            f"  {group:<26}{row['tensors']:>8}{row['params']:>11}{fan:>9}  {std:<17}"
            f"{rule.lr_mult:>10.4g}{decay:>8.3g}"
        )
    return "\n".join(lines)


def _range(values: list[float]) -> str:
    low, high = values[0], values[-1]
    return f"{low:.4g}" if math.isclose(low, high) else f"{low:.3g}..{high:.3g}"


# --------------------------------------------------------------------------- checkpoints

_RECORD = re.compile(r"^(.*)\.param_groups\.0\.parametrization$")


def recorded_parametrization(step_dir: str) -> str:
    """The label a checkpoint's optimizer groups carry; "standard" when they carry none.

    Read on its own, before the checkpoint is loaded: a checkpoint of another parametrisation has
    other optimizer groups, which the full load would reject with an error about a missing key
    (or, with as many groups, accept with the wrong hyper-parameters).
    """
    keys = _reader(step_dir).read_metadata().state_dict_metadata
    recorded = [match.group(1) for key in keys if (match := _RECORD.match(key))]
    if not recorded:
        return STANDARD
    state: dict = {}
    node = state
    *parents, leaf = recorded[0].split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = {"param_groups": [{"parametrization": ""}]}
    dcp.load(state, storage_reader=_reader(step_dir), no_dist=True)
    return str(node[leaf]["param_groups"][0]["parametrization"])


def refuse_other_parametrization(step_dir: str, parametrization: Parametrization) -> None:
    recorded = recorded_parametrization(step_dir)
    if recorded != parametrization.label:
        raise ConfigError(
            f"the checkpoint {step_dir} was trained with optim.parametrization = {recorded!r}, "
            f"but this run has {parametrization.label!r}: their init scales and per-group "
            "learning rates differ. Resume with the same optim.parametrization and optim.base_* "
            "values, or start a new training.run_dir"
        )


def _reader(path: str) -> dcp.StorageReader:
    if "://" in path:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(path)
    return dcp.FileSystemReader(path)
