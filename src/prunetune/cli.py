"""prunetune command line: light | search | config | eval | export (run flags generated from prunetune.config)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import PrunetuneError


# flag -> config key: type, choices and help come from the config dataclasses (prunetune.config)
RUN_FLAGS = {"model": "model.name_or_path", "gguf_file": "model.gguf_file", "task": "data.task",
             "data_dir": "data.data_dir", "train_file": "data.train_file", "dev_file": "data.dev_file",
             "output_dir": "output_dir", "epochs": "train.epochs", "max_steps": "train.max_steps",
             "batch_size": "train.batch_size", "lr": "train.lr", "seed": "train.seed",
             "max_train_samples": "data.max_train_samples", "max_eval_samples": "data.max_eval_samples"}
SWITCHES = {"resume": "train.resume", "overwrite": "overwrite"}  # store_true flags


def _overrides(args) -> dict:
    """CLI flags -> dotted config overrides (only the flags the user gave)."""
    o = {}
    for flag, key in RUN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            o[key] = value
    if getattr(args, "baseline", None) is not None:
        o["baseline"] = args.baseline
    for flag, key in SWITCHES.items():
        if getattr(args, flag, False):
            o[key] = True
    from .config import yaml_load

    for item in getattr(args, "set", None) or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise PrunetuneError(f"--set expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        try:  # YAML 1.2 numbers: `train.lr=1e-3` is a float, not the string YAML 1.1 makes of it
            o[key.strip()] = yaml_load(value)
        except PrunetuneError as exc:
            raise PrunetuneError(f"--set {key.strip()}: cannot parse value {value!r}: {exc}") from None
    return o


def _flag_type(key: str):
    """argparse type of a flag, from the field's type hint (int / float / str)."""
    from .config import field_type

    base = field_type(key)
    return base if base in (int, float, str) else str


def _flag(p: argparse.ArgumentParser, flag: str, key: str) -> None:
    from .config import key_info

    info = key_info(key)
    p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=_flag_type(key),
                   choices=list(info.choices) if info.choices else None, help=f"{info.help} [{key}]")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    from .config import key_info

    p.add_argument("--config", help="YAML run configuration (keys below; `prunetune config --list`)")
    for flag, key in RUN_FLAGS.items():
        _flag(p, flag, key)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key below, e.g. prune.heads=0.5")
    for flag, key in SWITCHES.items():
        p.add_argument("--" + flag, action="store_true", help=f"{key_info(key).help} [{key}]")


def _keys_epilog() -> str:
    from .config import format_keys

    return "configuration keys (YAML --config, or --set KEY=VALUE):\n" + format_keys(width=88)


def cmd_config(args) -> int:
    """Print the key reference (--list), or the configuration a run would use (config file + --set) as YAML."""
    from .config import format_keys, load_config

    if args.list:
        print(format_keys())
        return 0
    cfg = load_config(args.config, _overrides(args))
    if args.format == "json":
        print(json.dumps(cfg.to_dict(), indent=1))
    else:
        print(cfg.to_yaml(), end="")
    return 0


def cmd_light(args) -> int:
    from .config import load_config
    from .methods.light_peft import run

    cfg = load_config(args.config, _overrides(args))
    run(cfg, export=not args.no_export)
    return 0


def cmd_search(args) -> int:
    from .config import load_config
    from .methods.prune_peft import run

    overrides = _overrides(args)
    overrides.setdefault("output_dir", "runs/search")
    run(load_config(args.config, overrides), export=not args.no_export)
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from .config import from_dict
    from .data import encode, load_task, make_collate
    from .export import load
    from .export.manifest import MANIFEST, read_manifest
    from .models import cap_max_length
    from .train import evaluate, make_loader

    # flags, manifest, task and data are all checked before the (slow) model load
    for flag, value in (("--batch-size", args.batch_size), ("--max-eval-samples", args.max_eval_samples)):
        if value is not None and value < 1:
            raise PrunetuneError(f"{flag} must be >= 1, got {value}")
    path = Path(args.path)
    if not (path / MANIFEST).is_file() and (path / "model" / MANIFEST).is_file():  # a run folder: its export
        path = path / "model"
    info = read_manifest(path, verify=False)  # load() below verifies the checksums
    trained = info.get("task", {})
    task_name = args.task or trained.get("name") or "sst2"
    train_file = args.train_file or (args.dev_file if not args.data_dir else None)  # only the dev split is used
    data = {"task": task_name, "data_dir": args.data_dir, "train_file": train_file, "dev_file": args.dev_file,
            "max_eval_samples": args.max_eval_samples,
            "max_length": trained.get("max_length")}  # truncate as in training
    if task_name == "custom" or trained.get("name") == "custom":
        data.update(text_fields=trained.get("text_fields"), num_labels=trained.get("num_labels"),
                    label_field=trained.get("label_field"))
    cfg = from_dict({"data": {k: v for k, v in data.items() if v is not None}})
    task, _train, dev = load_task(cfg.data)
    _check_eval_task(task, info, path)
    label_names = trained.get("label_names")
    if task.name == "custom" and task.label_names and label_names and task.label_names != label_names:
        # label ids were inferred from these files alone: map them back to the ids the model was trained with
        missing = sorted(set(task.label_names) - set(label_names))
        if missing:
            raise PrunetuneError(f"labels {missing} were not seen in training (trained on {label_names})")
        dev = [dict(r, label=label_names.index(task.label_names[r["label"]])) for r in dev]
    if not (path / "tokenizer_config.json").is_file():
        raise PrunetuneError(f"export {path} has no tokenizer")
    loaded = load(path)
    max_length = cap_max_length(str(path), cfg.data.max_length)
    loader = make_loader(encode(dev, loaded.tokenizer, max_length), make_collate(loaded.tokenizer),
                         args.batch_size, False, 0)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(loaded.model.to(device), loader, task, device)
    print(json.dumps({"task": task.name, "rows": len(dev), **metrics}, indent=1))
    return 0


def _check_eval_task(task, info: dict, path) -> None:
    """The export's head must fit the task: a 2-class head cannot be scored on STS-B, nor an LM on labels."""
    if bool(info.get("causal_lm")) != bool(getattr(task, "causal_lm", False)):
        kind = "a causal LM" if info.get("causal_lm") else "a sequence classifier"
        raise PrunetuneError(f"export {path} is {kind}; task '{task.name}' needs "
                             f"{'a causal LM' if getattr(task, 'causal_lm', False) else 'a sequence classifier'}")
    trained = info.get("task", {}).get("num_labels")
    if not task.causal_lm and trained is not None and trained != task.num_labels:
        def heads(n):
            return "a regression head" if n == 1 else f"a {n}-class head"
        raise PrunetuneError(f"export {path} has {heads(trained)} (trained on '{info['task'].get('name')}'); "
                             f"task '{task.name}' needs {heads(task.num_labels)}")


def cmd_export(args) -> int:
    from pathlib import Path

    from .export import load, save_export
    from .export.save import check_export_target

    src = Path(args.path)
    if (src / "model" / "prunetune.json").is_file():
        src = src / "model"
    out = Path(args.out)
    if out.resolve() != src.resolve() and out.resolve().is_relative_to(src.resolve()):
        raise PrunetuneError(f"--out {out} lies inside the export {src} it reads; choose a folder outside it")
    check_export_target(out, args.overwrite)  # before loading: refused targets cost nothing
    loaded = load(src)
    peft_model = loaded.model if "lora" in loaded.info["peft"].split("+") else None
    hf = peft_model.base_model.model if peft_model is not None else loaded.model
    if args.merge and loaded.info["peft"] != "lora":  # adapters are non-linear: nothing to merge them into
        raise PrunetuneError(f"--merge needs a LoRA export; {src} holds '{loaded.info['peft']}'")
    card = (src / "README.md").read_text() if (src / "README.md").is_file() else None
    save_export(args.out, hf, loaded.plan, loaded.tokenizer, peft_model=peft_model, adapters=loaded.adapters,
                task_info=loaded.info.get("task"), merge=args.merge, card=card, overwrite=args.overwrite)
    print(f"wrote {args.out}" + (" (merged, standalone)" if args.merge else ""))
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as the one `prunetune: error:` line every other bad input gets (not usage + error)."""

    def error(self, message):
        raise PrunetuneError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    from .config import key_info

    parser = _Parser(prog="prunetune", description="Cheaper PEFT by pruning (Light-PEFT, PrunePEFT).")
    sub = parser.add_subparsers(dest="command", required=True)
    keys = {"epilog": _keys_epilog(), "formatter_class": argparse.RawDescriptionHelpFormatter}
    p = sub.add_parser("light", help="Light-PEFT: estimate, prune, fine-tune, export", **keys)
    _add_run_flags(p)
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                   help=f"{key_info('baseline').help} [baseline]")
    p.add_argument("--no-export", action="store_true", help="do not write the model export")
    p.set_defaults(func=cmd_light)
    p = sub.add_parser("search", help="PrunePEFT: search where PEFT units go, retrain, export", **keys)
    _add_run_flags(p)
    p.add_argument("--no-export", action="store_true", help="do not write the model export")
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("config", help="list the configuration keys, or print the configuration a run would use",
                       **keys)
    p.add_argument("--config", help="YAML run configuration")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key, e.g. prune.heads=0.5")
    p.add_argument("--list", action="store_true", help="list every key with its type, default and help")
    p.add_argument("--format", choices=["yaml", "json"], default="yaml")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("eval", help="evaluate an export on a task's dev set")
    p.add_argument("path")
    p.add_argument("--task")
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--train-file", dest="train_file")
    p.add_argument("--dev-file", dest="dev_file")
    p.add_argument("--max-eval-samples", dest="max_eval_samples", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("export", help="re-export a run or export (optionally merged into a standalone model)")
    p.add_argument("path", help="run output folder or export folder")
    p.add_argument("--out", required=True)
    p.add_argument("--merge", action="store_true", help="merge LoRA into the pruned base (standalone model)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even when it is a non-empty folder that is not a prunetune export")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    if "TRANSFORMERS_VERBOSITY" not in os.environ:  # transformers is already imported (through peft)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    from .io import release_run_dirs

    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except PrunetuneError as exc:
        print(f"prunetune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunetune: interrupted", file=sys.stderr)
        return 130
    finally:
        release_run_dirs()  # unlock the output folder; one left empty by a refused run is removed
        metric_logging = sys.modules.get("prunetune.train.metric_logging")
        if metric_logging is not None:  # flush TensorBoard / wandb / mlflow before the process ends
            metric_logging.close_metric_loggers()


if __name__ == "__main__":
    sys.exit(main())
