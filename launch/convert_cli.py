"""`lesa convert openimages|nuswide|lesa-split`: the converters' command lines.

Kept apart from cli.py so the shared CLI only registers them; heavy imports (numpy, PIL, ray)
happen inside each command, so `lesa --help` stays instant.
"""

from __future__ import annotations

import argparse


def _image_options(args, **defaults):
    from datasets.makers.convert import ImageOptions

    return ImageOptions(short_side=args.image_size, quality=args.jpeg_quality, **defaults)


def cmd_openimages(args) -> int:
    from datasets.makers.openimages import convert_openimages

    convert_openimages(
        args.out,
        descriptions=args.class_descriptions,
        seen=args.seen,
        unseen=args.unseen,
        annotations=args.annotations,
        images=args.images,
        vectors=args.vectors,
        vector_names=args.vector_names,
        embeddings=args.embeddings,
        missing=args.missing,
        splits=tuple(args.splits),
        shard_size=args.shard_size,
        options=_image_options(args),
        max_images=args.max_images,
        num_cpus=args.num_cpus,
        use_ray=not args.no_ray,
    )
    return 0


def cmd_nuswide(args) -> int:
    from datasets.makers.nuswide import convert_nuswide

    convert_nuswide(
        args.out,
        root=args.root,
        images=args.images,
        vectors=args.vectors,
        vector_names=args.vector_names,
        embeddings=args.embeddings,
        missing=args.missing,
        val_size=args.val_size,
        shard_size=args.shard_size,
        options=_image_options(args, min_bytes=args.min_bytes),
        placeholder=args.placeholder,
        max_images=args.max_images,
        num_cpus=args.num_cpus,
        use_ray=not args.no_ray,
    )
    return 0


def cmd_lesa_split(args) -> int:
    from datasets.makers.lesa_split import convert_lesa_split

    convert_lesa_split(args.src, args.out)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        required=True,
        help="dataset root to write (path or fsspec URL); a rerun skips the shards already complete",
    )
    g = p.add_argument_group("label vectors (one of)")
    g.add_argument(
        "--vectors",
        metavar="SPEC",
        action="append",
        help="word vectors: a GloVe/word2vec text file (.gz ok), or a .npy matrix with "
        "--vector-names; repeat to add sources (the first that has a word wins); or wordllama, "
        "or clip-text:PATH (CLIP's text tower, docs/backbones.md)",
    )
    g.add_argument(
        "--vector-names",
        metavar="FILE",
        action="append",
        help="row names of a .npy --vectors, one per line (one per .npy, in order)",
    )
    g.add_argument(
        "--embeddings",
        metavar="NPY",
        help="precomputed label vectors [labels, dim], rows in labels.tsv order (seen, then unseen)",
    )
    g.add_argument(
        "--missing",
        choices=["error", "random"],
        default="error",
        help="a label with no word in the vectors: stop (default), or a random vector (seeded by its name)",
    )
    p.add_argument("--image-size", type=int, default=256, help="short side after resizing (never upscaled)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (one Ray task each)")
    p.add_argument("--max-images", type=int, help="at most this many images per split (a trial run)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started when RAY_ADDRESS is unset")
    p.add_argument("--no-ray", action="store_true", help="write the shards one by one in this process")


def add_convert_parser(sub) -> None:
    convert = sub.add_parser("convert", help="convert Open Images or NUS-WIDE to the dataset contract")
    kinds = convert.add_subparsers(dest="dataset", required=True)

    p = kinds.add_parser("openimages", help="Open Images v4 human-verified labels, LESA's 7,186/400 split")
    p.add_argument("--class-descriptions", required=True, help="class-descriptions.csv (MID,display name)")
    p.add_argument("--seen", required=True, help="seen MIDs: one per line, or a TSV with a mid column")
    p.add_argument("--unseen", required=True, help="unseen MIDs: one per line, or a TSV with a mid column")
    p.add_argument(
        "--annotations", required=True, help="folder holding {train,validation,test}-annotations-human-imagelabels.csv"
    )
    p.add_argument(
        "--images",
        required=True,
        help="folder of <ImageID>.jpg; may contain {split} (train/validation/test), e.g. /data/oi/{split}",
    )
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"], choices=["train", "val", "test"])
    _common(p)
    p.set_defaults(func=cmd_openimages)

    p = kinds.add_parser("nuswide", help="NUS-WIDE release, Fast0Tag/LESA's 925 seen tags / 81 unseen concepts")
    p.add_argument(
        "--root",
        required=True,
        help="NUS-WIDE folder: ImageList/, NUS_WID_Tags/, Concepts81.txt, "
        "AllLabels/ (or ConceptsList/, Groundtruth/AllLabels/)",
    )
    p.add_argument("--images", help="folder of <concept folder>/<file>.jpg (default: ROOT/Flickr)")
    p.add_argument("--val-size", type=int, default=5000, help="first N training images form val (LESA: 5000)")
    p.add_argument("--min-bytes", type=int, default=4000, help="skip image files of at most this size (LESA: 4000)")
    p.add_argument(
        "--placeholder",
        metavar="FILE",
        help="skip images byte-identical to this file (Flickr's 'photo unavailable' image)",
    )
    _common(p)
    p.set_defaults(func=cmd_nuswide)

    p = kinds.add_parser(
        "lesa-split",
        help="LESA's classes-trainable.txt, unseen_labels.pkl and top_400_unseen.csv to seen.txt and unseen.txt",
    )
    p.add_argument(
        "--from", dest="src", required=True, help="folder with the three files (LESA's data/OpenImages/2018_04)"
    )
    p.add_argument("--out", required=True, help="folder to write seen.txt (7,186 MIDs) and unseen.txt (400)")
    p.set_defaults(func=cmd_lesa_split)
