"""Two runs of one study side by side: each cell's majority frontier, how many √2 steps apart, and whether the
findings are the same (studies/sweep/compare.py). For reproducibility checks across kernel paths or seed sets:

  python studies/agc_lambda.py --output results/seed0
  python studies/agc_lambda.py --output results/seed10 --seed 10
  python studies/compare_maps.py results/seed0/agc_lambda results/seed10/agc_lambda
"""
from __future__ import annotations

import argparse
import sys

import pyarrow.parquet as pq

import storage
from studies.sweep.compare import comparison_text


def _name(folder: str) -> str:
    """'results/seed10/agc_lambda' -> 'seed10': the output that tells two runs of one study apart."""
    parts = [p for p in folder.rstrip("/").split("/") if p]
    return parts[-2] if len(parts) > 1 else parts[-1]


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="a study's output folder (holding cells.parquet), local, s3:// or gs://")
    p.add_argument("b", help="the other study's output folder")
    args = p.parse_args(argv)
    tables = []
    for d in (args.a, args.b):
        fs, path = storage.resolve(storage.uri.join(d, "cells.parquet"))
        if not fs.get_file_info(path).type.name == "File":
            p.error(f"{d} holds no cells.parquet: give the folder a finished study wrote (<output>/<study name>)")
        tables.append(pq.read_table(path, filesystem=fs))
    text = comparison_text(*tables, names=(_name(args.a), _name(args.b)))
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
