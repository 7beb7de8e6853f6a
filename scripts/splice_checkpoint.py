"""Copy a checkpoint with some of its weights taken from another one (a controlled experiment).

A multi-stage recipe's stages often train disjoint parts of a model: in `recipes/tiny-mgm.yaml`
the HR ConvNeXt and the patch mining learn in `hr-contrastive` and `mining`, and the LLM in
`llava` and `mgm` (the mining's query still reads `connector.pos_embed`, which `llava` trains, so
the parts are not fully independent). To ask "what would this run have done with that run's HR
path", take
one run's stage-boundary checkpoint (weights, tokenizer and `trainer_state.pt` are copied as they
are) and replace every tensor whose name starts with one of the prefixes by the donor's:

    python scripts/splice_checkpoint.py BASE DONOR OUT --prefix vision_tower_aux. \
        --prefix connector.vlm_uni_

Then resume from OUT (`mkdir -p R/checkpoints; cp -r OUT R/checkpoints/stageK-step0000000;
echo stageK-step0000000 > R/checkpoints/latest; minigem train RECIPE
training.output_dir=R --resume`). Only weights move: both checkpoints must have the same tensor
names and shapes under the prefixes (a clear error lists what differs), and each prefix must match
something. OUT is written atomically and must not exist yet.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minigem.checkpoints.native import atomic_dir

WEIGHTS = "model.safetensors"


def _weights(directory: Path) -> Path:
    path = directory / WEIGHTS
    if not path.is_file():
        raise SystemExit(f"{directory}: no {WEIGHTS} (a minigem checkpoint directory is expected)")
    return path


def splice(base: Path, donor: Path, out: Path, prefixes: list[str]) -> list[str]:
    """Write OUT = BASE with the donor's tensors under `prefixes`; returns the names replaced."""
    if not prefixes:
        raise SystemExit("give at least one --prefix")
    if out.exists():
        raise SystemExit(f"{out}: already exists (the splice writes a new checkpoint)")
    base_path, donor_path = _weights(base), _weights(donor)
    with safe_open(str(base_path), "pt") as f:
        meta = f.metadata()
    state, other = load_file(str(base_path)), load_file(str(donor_path))
    picked = {n for n in state if n.startswith(tuple(prefixes))}
    offered = {n for n in other if n.startswith(tuple(prefixes))}
    problems = [f"only in {base}: {n}" for n in sorted(picked - offered)]
    problems += [f"only in {donor}: {n}" for n in sorted(offered - picked)]
    problems += [f"{n}: {tuple(state[n].shape)} in {base}, {tuple(other[n].shape)} in {donor}"
                 for n in sorted(picked & offered) if state[n].shape != other[n].shape]
    problems += [f"--prefix {p!r} matches no tensor of {base}" for p in prefixes
                 if not any(n.startswith(p) for n in state)]
    if problems:
        raise SystemExit("cannot splice:\n  " + "\n  ".join(problems))
    for n in picked:
        state[n] = other[n].to(state[n].dtype)
    with atomic_dir(out) as tmp:
        for item in base.iterdir():
            if item.name == WEIGHTS:
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        save_file(state, str(tmp / WEIGHTS), metadata=meta)
    return sorted(picked)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path, help="checkpoint directory to copy")
    ap.add_argument("donor", type=Path, help="checkpoint directory the replaced tensors come from")
    ap.add_argument("out", type=Path, help="new checkpoint directory")
    ap.add_argument("--prefix", action="append", default=[], help="tensor-name prefix (repeatable)")
    args = ap.parse_args(argv)
    names = splice(args.base, args.donor, args.out, args.prefix)
    print(f"{args.out}: {len(names)} tensors from {args.donor}, the rest from {args.base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
