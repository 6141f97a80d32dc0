"""Convert between HF Llama 4 checkpoints and ours.

    python -m trainer.convert from-hf HF_DIR CKPT_DIR [--dtype float32|bfloat16]
    python -m trainer.convert to-hf CKPT_DIR HF_DIR [--config FILE] [--drop-expert-bias]

`from-hf` writes a DCP checkpoint (model weights only) and a `config.toml` whose model section
describes it; train from it with `--config CKPT_DIR/config.toml --checkpoint.init_from=CKPT_DIR`.
`to-hf` reads the model weights of any of our checkpoints (a run's `checkpoints/step-N`, whose
config is found at `../../config.toml`, or a converted one) and writes an HF directory.
Runs in one process, without a process group: the whole model is in memory once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from trainer.config import Config, load_config, to_toml
from trainer.model.hf import from_hf, to_hf
from trainer.model.transformer import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def convert_from_hf(hf_dir: Path, ckpt_dir: Path, dtype: torch.dtype | None) -> None:
    model_cfg, model = from_hf(hf_dir, dtype)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt_dir), no_dist=True)
    (ckpt_dir / "config.toml").write_text(to_toml(Config(model=model_cfg)))
    print(f"wrote {ckpt_dir} ({sum(p.numel() for p in model.parameters()):,} parameters)")


def find_config(ckpt_dir: Path, explicit: Path | None) -> Path:
    candidates = (
        [explicit]
        if explicit
        else [ckpt_dir / "config.toml", ckpt_dir.parent.parent / "config.toml"]
    )
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError(
        f"no config.toml for {ckpt_dir}: looked at {', '.join(map(str, candidates))}; pass --config"
    )


def convert_to_hf(
    ckpt_dir: Path, hf_dir: Path, config: Path | None, drop_expert_bias: bool
) -> None:
    model_cfg = load_config(find_config(ckpt_dir, config)).model
    model = Transformer(model_cfg)
    state = model.state_dict()
    dcp.load({"model": state}, checkpoint_id=str(ckpt_dir), no_dist=True)
    model.load_state_dict(state)
    to_hf(model, model_cfg, hf_dir, drop_expert_bias=drop_expert_bias)
    print(f"wrote {hf_dir}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.convert", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    source = commands.add_parser("from-hf", help="HF directory -> our checkpoint")
    source.add_argument("hf_dir", type=Path)
    source.add_argument("ckpt_dir", type=Path)
    source.add_argument("--dtype", choices=sorted(DTYPES), help="default: the stored dtype")
    target = commands.add_parser("to-hf", help="our checkpoint -> HF directory")
    target.add_argument("ckpt_dir", type=Path)
    target.add_argument("hf_dir", type=Path)
    target.add_argument("--config", type=Path, help="default: the checkpoint's config.toml")
    target.add_argument("--drop-expert-bias", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "from-hf":
        convert_from_hf(args.hf_dir, args.ckpt_dir, DTYPES.get(args.dtype))
    else:
        convert_to_hf(args.ckpt_dir, args.hf_dir, args.config, args.drop_expert_bias)


if __name__ == "__main__":
    main()
