"""`lesa`: the command line. Heavy imports (torch, ray, mlflow) happen inside each command, so
`lesa --help` and config errors are instant."""

from __future__ import annotations

import argparse
import json
import os
import sys


def cmd_synth(args) -> int:
    from datasets.makers.synthetic import write_synthetic

    sizes = {"train": args.train, "val": args.val, "test": args.test}
    write_synthetic(
        args.out,
        seed=args.seed,
        sizes={k: v for k, v in sizes.items() if v > 0},
        image_size=args.image_size,
        shard_size=args.shard_size,
        workers=args.workers,
        embed_noise=args.embed_noise,
    )
    return 0


def cmd_train(args) -> int:
    from trainer.config import load_config

    cfg = load_config(args.config, args.set)  # before the driver's imports (torch, ray, mlflow): errors in 1 s
    from launch.driver import run_training

    run_training(cfg, args.out, resume=args.resume)
    return 0


def cmd_submit(args) -> int:
    from launch.preflight import check_registries
    from launch.submit import submit
    from trainer.config import load_config

    check_registries(load_config(args.config, args.set))  # a typo fails before anything is uploaded
    return submit(
        args.config,
        args.set,
        out=args.out,
        address=args.address,
        wait=not args.no_wait,
        stop_on_interrupt=args.stop_on_interrupt,
    )


def cmd_compare(args) -> int:
    from launch.compare import ABLATIONS, model_variants, run_compare, run_seeds
    from trainer.config import load_config

    base = load_config(args.config, args.set)
    variants = model_variants(args.models, base.model.num_attentions) + (ABLATIONS if args.ablations else [])
    if args.seeds:
        table = run_seeds(args.config, variants, args.out, args.set, args.seeds)
    else:
        table = run_compare(args.config, variants, args.out, args.set)
    return 0 if any(row["status"] == "ok" for row in table["rows"]) else 1


def cmd_evaluate(args) -> int:
    from trainer.config import load_config

    cfg = load_config(args.config, args.set)  # before the driver's imports, as in cmd_train
    from launch.driver import run_evaluation

    run_evaluation(cfg, args.checkpoint, args.out)
    return 0


def cmd_predict(args) -> int:
    from launch.predict import predict

    return predict(
        args.checkpoint,
        args.images,
        labels=args.labels,
        label_vectors=args.label_vectors,
        label_vector_names=args.label_vector_names,
        top_k=args.top_k,
        overlays=args.overlays,
        device=args.device,
        data=args.data,
    )


def cmd_extract(args) -> int:
    from trainer.config import load_config

    cfg = load_config(args.config, args.set)  # before torch is imported, as in cmd_train
    from launch.extract import run_extract

    run_extract(cfg, args.out, splits=args.splits, precision=args.precision)
    return 0


def cmd_embed_labels(args) -> int:
    from datasets.makers.embeddings import write_label_vectors

    write_label_vectors(args.names, args.encoder, args.out, templates=args.prompt_templates, missing=args.missing)
    return 0


def cmd_metrics(args) -> int:
    """The evaluation's own exact path (the K-th score kernel, one grouped sort for AP), fed row
    blocks of memory-mapped matrices: memory follows the annotations, not images x labels x 8 bytes."""
    import numpy as np

    from trainer.evaluation.metrics import Annotations, evaluate_settings

    scores = np.load(args.scores, mmap_mode="r", allow_pickle=False)
    labels = np.load(args.labels, mmap_mode="r", allow_pickle=False)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise SystemExit(
            f"lesa metrics: {args.scores} {scores.shape} and {args.labels} {labels.shape} "
            f"must be two matrices of the same images x labels shape"
        )
    parts = []
    for start in range(0, len(labels), 4096):
        block = np.asarray(labels[start : start + 4096])
        bad = np.setdiff1d(np.unique(block), [-1, 0, 1])
        if bad.size:
            raise SystemExit(
                f"lesa metrics: {args.labels} holds values {bad.tolist()}; expected +1 present, -1 absent, 0 unknown"
            )
        parts.append(Annotations.from_dense(block.astype(np.int8, copy=False), row_offset=start))
    everything = {"all": np.arange(scores.shape[1])}
    print(json.dumps(evaluate_settings(scores, Annotations.concatenate(parts), everything, args.k)["all"], indent=1))
    return 0


def add_set(
    p: argparse.ArgumentParser, text: str = "override a config key, e.g. --set train.max_steps=100 (repeatable)"
):
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=text)


def add_synth(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="write the synthetic benchmark in the dataset contract",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,  # --help shows every default
    )
    p.add_argument("out", help="output dataset root (path or fsspec URL)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images, labels and label vectors")
    p.add_argument("--train", type=int, default=3000, help="training images")
    p.add_argument("--val", type=int, default=300, help="validation images (seen compositions only)")
    p.add_argument("--test", type=int, default=600, help="test images (seen and unseen compositions)")
    p.add_argument("--image-size", type=int, default=96, help="image side in pixels")
    p.add_argument("--shard-size", type=int, default=250, help="samples per shard")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="generator processes")
    p.add_argument(
        "--embed-noise",
        type=float,
        default=0.15,
        help="norm of each label vector's noise relative to its colour+shape part; images do not change with it",
    )
    p.set_defaults(func=cmd_synth)


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train and evaluate on a Ray cluster (local if RAY_ADDRESS is unset)")
    p.add_argument("config", help="experiment YAML, e.g. launch/synthetic.yaml")
    p.add_argument("--out", required=True, help="output folder: metrics.json, model.pt, checkpoints/")
    add_set(p)
    p.add_argument(
        "--resume",
        metavar="latest|PATH",
        help="continue the run in --out from its latest checkpoint, or from a checkpoint folder; "
        "the number of workers may differ",
    )
    p.set_defaults(func=cmd_train)


def add_submit(sub) -> None:
    p = sub.add_parser("submit", help="run `lesa train CONFIG` as a Ray job on a cluster (the YAML's submit: section)")
    p.add_argument("config", help="experiment YAML inside submit.working_dir")
    p.add_argument("--address", help="Ray dashboard URL (default: submit.address, $RAY_ADDRESS, http://127.0.0.1:8265)")
    p.add_argument("--out", help="results folder on the head node (default: submit.out)")
    add_set(p)
    p.add_argument("--no-wait", action="store_true", help="return once submitted")
    p.add_argument("--stop-on-interrupt", action="store_true", help="Ctrl-C stops the job (default: detach)")
    p.set_defaults(func=cmd_submit)


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained model.pt on the cluster, any number of workers")
    p.add_argument("config", help="experiment YAML (data.url, model, eval.*, scaling.num_workers)")
    p.add_argument(
        "--checkpoint",
        help="a model.pt written by lesa train, or its folder (none for a model that trains nothing: clip_zeroshot)",
    )
    p.add_argument("--out", required=True, help="output folder: metrics.json, per_label_*.tsv")
    add_set(p)
    p.set_defaults(func=cmd_evaluate)


def add_extract(sub) -> None:
    p = sub.add_parser(
        "extract",
        help="cache a frozen backbone's features of every image (a feature dataset "
        "that lesa train and lesa evaluate read in place of the images)",
    )
    p.add_argument(
        "config",
        help="experiment YAML: data.url (image dataset), data.image_size, model.backbone "
        "(frozen, e.g. vgg19) and its weights, scaling.*",
    )
    p.add_argument(
        "--out",
        required=True,
        help="feature dataset root to write (path or fsspec URL); a rerun skips the shards already done",
    )
    p.add_argument("--splits", nargs="+", metavar="SPLIT", help="splits to extract (default: all)")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="run the backbone under autocast (features are stored float16 either way)",
    )
    add_set(p)
    p.set_defaults(func=cmd_extract)


def add_compare(sub) -> None:
    p = sub.add_parser(
        "compare", help="train LESA and the baselines on the same data, budget and seed; write the paper's table"
    )
    p.add_argument("config", help="experiment YAML, e.g. launch/synthetic.yaml")
    p.add_argument(
        "--models",
        nargs="+",
        default=["conse", "labelem", "fast0tag", "one_attention_per_label", "lesa"],
        help="model.name of each row, in order (default: the paper's five)",
    )
    p.add_argument(
        "--ablations",
        action="store_true",
        help="add LESA without L_dist, without L_rel, without L_div, with M=1 and M=5",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="one comparison per seed (train.seed) in OUT/seed<S>; OUT/table.md is their mean, "
        "with the per-seed values",
    )
    p.add_argument("--out", required=True, help="output folder: table.md, table.json, one folder per model")
    add_set(p, "override a config key for every model (repeatable)")
    p.set_defaults(func=cmd_compare)


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="top-K labels of image files with a trained model (plain torch, no Ray)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (paths or fsspec URLs)")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="the --out folder of lesa train, or its model.pt (config.json must lie beside it)",
    )
    p.add_argument(
        "--labels",
        nargs="+",
        metavar="NAME",
        help="score only these names instead of the dataset's labels; names the dataset lacks need --label-vectors",
    )
    p.add_argument(
        "--label-vectors",
        metavar="SPEC",
        help="vectors for new names: a GloVe/word2vec text file, a .npy matrix, wordllama, or clip-text:PATH",
    )
    p.add_argument("--label-vector-names", metavar="FILE", help="the row names of a .npy --label-vectors, one per line")
    p.add_argument("--top-k", type=int, default=10, help="labels printed per image (default 10)")
    p.add_argument("--overlays", metavar="DIR", help="also write one attention overlay PNG per image here")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--data", metavar="URL", help="dataset root for the label vocabulary (default: data.url of the config)"
    )
    p.set_defaults(func=cmd_predict)


def add_metrics(sub) -> None:
    p = sub.add_parser("metrics", help="LESA's metrics for a score matrix and a label matrix")
    p.add_argument("--scores", required=True, help=".npy float [images, labels]")
    p.add_argument("--labels", required=True, help=".npy [images, labels]: +1 present, -1 absent, 0 unknown")
    p.add_argument("--k", type=int, nargs="+", default=[3, 5])
    p.set_defaults(func=cmd_metrics)


def add_embed_labels(sub) -> None:
    p = sub.add_parser(
        "embed-labels", help="label vectors for a list of names: a .npy and its names file, as lesa convert reads them"
    )
    p.add_argument("names", help="label names, one per line (path or fsspec URL)")
    p.add_argument(
        "--encoder",
        required=True,
        metavar="SPEC",
        help="clip-text:PATH (a CLIP checkpoint folder), wordllama, or a GloVe/word2vec text file",
    )
    p.add_argument("--out", required=True, metavar="X.npy", help="the vectors; the names go beside it in X.txt")
    p.add_argument(
        "--prompt-templates",
        metavar="FILE",
        help="clip-text only: one template per line, {} for the name (default: docs/backbones.md's set)",
    )
    p.add_argument(
        "--missing", choices=["error", "random"], default="error", help="a name with no vector (word vectors)"
    )
    p.set_defaults(func=cmd_embed_labels)


def add_convert(sub) -> None:
    from launch.convert_cli import add_convert_parser

    add_convert_parser(sub)  # lesa convert openimages|nuswide|lesa-split


COMMANDS = (add_synth, add_train, add_submit, add_evaluate, add_extract, add_compare, add_predict, add_convert,
            add_embed_labels, add_metrics)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lesa", description="LESA multi-label zero-shot tagging at scale")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:  # in the order `lesa --help` lists them
        add(sub)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = build_parser().parse_args(argv)
    from datasets.contract import DatasetError
    from launch.errors import RunFailed
    from trainer.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, DatasetError) as exc:
        print(f"lesa {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:  # the workers' tracebacks are in the log above and in Ray's logs
        print(f"lesa {args.command}: run failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
