"""Handlers for the `minigem` CLI verbs (argument parsing lives in cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from minigem.errors import DataError, MinigemError

if TYPE_CHECKING:
    import torch

EXAMPLES = Path("examples")


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file, with a clear error naming the file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"image file not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read image {p}: {err}") from None


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`--device` / `--dtype` -> (device, dtype); a clear error for a device that is not there."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise MinigemError(f"--device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MinigemError(f"--device {device}: no CUDA GPU is available (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MinigemError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    if dtype == "auto":
        bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        return dev, torch.bfloat16 if bf16 else torch.float32
    return dev, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def load(path: str | None, args: argparse.Namespace | None = None):
    from minigem.checkpoints.native import load_model

    dev, dtype = resolve_device(getattr(args, "device", "cpu"), getattr(args, "dtype", "auto"))
    return load_model(path, device=dev, dtype=dtype)


def cmd_demo(args: argparse.Namespace) -> int:
    folder = Path(args.examples) if args.examples else EXAMPLES
    qfile = folder / "questions.json"
    if not qfile.is_file():
        raise MinigemError(f"{qfile}: no examples file")
    model = load(None)
    print(f"minigem demo: bundled model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    for item in json.loads(qfile.read_text()):
        image = open_image(folder / item["image"])
        answers = model.chat_batch([(image, q) for q in item["questions"]], max_new_tokens=64)
        print(f"\n[{item['image']}]" + (f"  (truth: {item['truth']})" if item.get("truth") else ""))
        for q, a in zip(item["questions"], answers, strict=True):
            print(f"  Q: {q}\n  A: {a}")
    from minigem.imagegen.command import demo_generation

    demo_generation(model)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    gen = {**_gen(args), "system": args.system}
    if args.gen:
        from minigem.imagegen.command import chat_gen

        return chat_gen(args, gen)
    model = load(args.model, args)
    images = [open_image(p) for p in args.image]
    if args.question is not None:
        text = model.chat_batch([(images, args.question)], **gen)[0]
        if args.json:
            print(json.dumps({"text": text}, ensure_ascii=False))
        else:
            print(text)
        return 0
    return interactive(model, images, gen)


def _gen(args: argparse.Namespace) -> dict:
    from minigem.cli import _gen_kwargs

    return _gen_kwargs(args)


def interactive(model, images: list[Image.Image], gen: dict,
                image_turn: Callable[[str], tuple[str, list[str]]] | None = None) -> int:
    """A multi-turn terminal chat. Commands: /image PATH, /reset, /quit.

    With ``image_turn`` every user turn asks for an image (``<GEN>``), and the answer goes
    through it: it returns the answer to keep and lines to print after it.
    """
    from minigem.data.records import Message
    from minigem.imagegen.markers import add_gen_marker, strip_markers

    print("minigem chat. /image PATH adds an image, /reset starts over, /quit exits.")
    history: list[Message] = []
    pending = list(images)
    used: list[Image.Image] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history, pending, used = [], [], []
            print("(conversation cleared)")
            continue
        if line.startswith("/image"):
            try:
                pending.append(open_image(line.split(maxsplit=1)[1]))
                print(f"(image added; {len(pending)} pending)")
            except (IndexError, MinigemError) as err:
                print(f"error: {err if not isinstance(err, IndexError) else 'usage: /image PATH'}")
            continue
        tok = model.config.image_token
        content = (tok + "\n") * len(pending) + line if tok not in line else line
        if image_turn is not None:
            content = add_gen_marker(content)
        history.append(Message("user", content))
        used += pending
        pending = []
        try:
            answer = model.chat_batch([(used, history)], **gen)[0]
        except MinigemError as err:
            history.pop()
            print(f"error: {err}")
            continue
        extra: list[str] = []
        if image_turn is not None:
            try:
                answer, extra = image_turn(answer)
            except MinigemError as err:
                answer, extra = strip_markers(answer), [f"error: {err}"]
        history.append(Message("assistant", answer))
        print(f"minigem> {answer}")
        for note in extra:
            print(note)


def cmd_train(args: argparse.Namespace) -> int:
    from minigem.config import load_recipe
    from minigem.training.build import build_for_recipe
    from minigem.training.loop import Trainer

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.t2i is not None:  # a text-to-image recipe (diffusion stages)
        from minigem.training.diffusion import DiffusionTrainer

        final = DiffusionTrainer(recipe).run(resume=args.resume, stop_after=args.stop_after)
        print(f"checkpoint: {final}")
        return 0
    model = build_for_recipe(recipe, resume=args.resume)
    trainer = Trainer(recipe, model)
    final = trainer.run(resume=args.resume, stop_after=args.stop_after)
    print(f"checkpoint: {final}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from minigem.data.llava_json import LlavaJsonDataset
    from minigem.evaluation.runner import evaluate

    if args.predictions and not Path(args.predictions).resolve().parent.is_dir():
        raise DataError(f"--predictions {args.predictions}: folder {Path(args.predictions).resolve().parent} "
                        "does not exist")
    model = load(args.model, args)
    if args.no_hr:
        if not model.has_hr_path:
            raise MinigemError(f"--no-hr: the model {args.model or 'bundled'} has no high-res path "
                               "(not a Mini-Gemini)")
        model.use_hr = False
    source = LlavaJsonDataset(args.data, args.image_folder, image_token=model.config.image_token)
    report = evaluate(model, source, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      limit=args.limit, keep_examples=len(source) if args.predictions else 0)
    if args.predictions:
        from minigem.fileio import atomic_write

        lines = "".join(json.dumps(e) + "\n" for e in report.examples)
        atomic_write(args.predictions, lines.encode())
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format())
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from minigem.data.synth import CATEGORIES, write_dataset

    tasks = None
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        bad = [t for t in tasks if t not in CATEGORIES]
        if bad:
            raise MinigemError(f"--tasks: unknown categories {bad}; valid: {', '.join(CATEGORIES)}")
    if args.n < 1:
        raise MinigemError("--n must be at least 1")
    path = write_dataset(args.out, args.n, args.seed, args.image_size, tasks)
    print(f"wrote {args.n} records to {path}", file=sys.stderr)
    print(path)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    if args.fmt == "mgm":
        from minigem.checkpoints.mgm import import_mgm

        out = import_mgm(args.src, args.dst, vision_tower=args.vision_tower,
                         vision_tower_aux=args.vision_tower_aux, template=args.template)
    elif args.fmt == "moe-llava":
        from minigem.checkpoints.moe_llava import import_moe_llava

        out = import_moe_llava(args.src, args.dst, vision_tower=args.vision_tower, template=args.template)
    else:
        from minigem.checkpoints import hf_llava

        out = hf_llava.import_hf_llava(args.src, args.dst)
    print(out)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from minigem.checkpoints.native import BUNDLED
    from minigem.explain import explain, render

    if args.top_k < 0:
        raise MinigemError(f"--top-k must be >= 0, got {args.top_k}")
    out = Path(args.out).expanduser()
    if not out.parent.is_dir():
        raise MinigemError(f"--out: no such directory: {out.parent}")
    image = open_image(args.image)
    model = load(args.model, args)
    name = str(Path(args.model).expanduser()) if args.model else str(BUNDLED)
    result = explain(model, image, args.question, name=name, system=args.system, **_gen(args))
    try:
        render(result, top_k=args.top_k).save(out, format="PNG")
    except OSError as err:
        raise MinigemError(f"cannot write {out}: {err}") from None
    if args.json:
        info = result.to_dict(args.top_k)
        info["out"] = str(out)
        print(json.dumps(info, ensure_ascii=False))
        return 0
    print(result.answer)
    for t in result.top_tokens(args.top_k):
        where = "" if t["view"] == "image" else f" {t['view']}"
        print(f"  #{t['rank']}{where} token ({t['row']}, {t['col']}) score {t['score']:.3f} "
              f"box {t['box']}", file=sys.stderr)
    print(f"heat map: {out}", file=sys.stderr)
    return 0


def cmd_inspect_routing(args: argparse.Namespace) -> int:
    from minigem.data.llava_json import LlavaJsonDataset
    from minigem.evaluation.routing import collect_routing, plot_routing

    model = load(args.model, args)
    source = LlavaJsonDataset(args.data, args.image_folder, image_token=model.config.image_token)
    stats = collect_routing(model, source, limit=args.limit)
    plot_routing(stats, args.out)
    if args.json:
        print(json.dumps(stats.to_dict(), indent=2))
    else:
        print(stats.format())
    print(f"plot: {args.out}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from minigem.checkpoints import hf_llava

    out = hf_llava.export_hf_llava(args.src, args.dst)
    print(out)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from minigem.serving.server import serve

    return serve(args.model, host=args.host, port=args.port, api_key=args.api_key,
                 device=resolve_device(args.device, args.dtype),
                 threads=args.threads, max_batch=args.max_batch, max_queue=args.max_queue,
                 timeout_s=args.timeout, allow_remote_images=args.allow_remote_images,
                 image_pipeline=None if args.no_image_generation else image_pipeline(args))


def image_pipeline(args: argparse.Namespace) -> Path | None:
    """``--image-pipeline``, else the bundled pipeline when it is installed, else None."""
    from minigem.imagegen.bridge import default_pipeline

    return Path(args.image_pipeline) if args.image_pipeline else default_pipeline()
