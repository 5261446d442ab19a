"""What a finding rests on, shared by the findings' modules (findings.py, lambdas.py): a cell's frontier as text
(with its edge marks) and as a number, each seed's own frontier, and in how many seeds an effect holds. Pure
functions of cells.parquet's rows."""
from __future__ import annotations

from studies.sweep.frontier import FOUND, NONE


def frontier_text(c: dict | None) -> str:
    """A cell's frontier in the map: '0.4', '≥12.8' (trains up to the largest lr tried: a lower bound),
    'undecided', 'none'. A frontier at the smallest lr tried is a number like any other: it trains there and the
    lr above it fails, so it is bracketed; what the grid cannot say there is whether a smaller lr would do better,
    which is the best lr's mark (best_lr_text)."""
    if c is None:
        return "-"
    if c["frontier"] != FOUND:
        return c["frontier"]
    return edge_mark(c) + f"{c['max_stable_lr']:g}"


def edge_mark(c: dict) -> str:
    """'≥' for a frontier at the largest lr tried (a lower bound), '' inside the grid."""
    return "≥" if c["max_stable_lr_at_edge"] else ""


def best_lr_text(lr: float | None, c: dict) -> str:
    """A best lr as words and tables write it: '0.1', '≤0.025' where it is the smallest lr tried (nothing below
    it was tried: the optimum may lie lower, an upper bound on it), '-' where there is none."""
    if lr is None:
        return "-"
    return ("≤" if lr == c.get("lowest_lr_tried") else "") + f"{lr:g}"


def frontier_lr(c: dict | None) -> float | None:
    """A cell's frontier as a number for comparisons: 0 when no lr trains (every lr diverged), None when
    undecided or missing."""
    if c is None or c["frontier"] not in (FOUND, NONE):
        return None
    return c["max_stable_lr"] if c["frontier"] == FOUND else 0.0


def seed_values(c: dict) -> dict[int, float | None]:
    """seed -> that seed's own frontier (0: every lr diverged; None: undecided)."""
    return dict(zip(c.get("seed_list") or [], c.get("max_stable_lr_by_seed") or []))


def support(cells: list[dict], holds) -> tuple[int, int, list[int]]:
    """(seeds in which `holds(*frontiers)` is true, seeds, the seeds that broke it): each seed's own frontier per
    cell; a cell that lacks the seed (nothing of it was replicated) reads its majority frontier."""
    seeds = sorted({s for c in cells for s in c.get("seed_list") or []})
    broke = []
    for s in seeds:
        vals = [seed_values(c).get(s, frontier_lr(c)) for c in cells]
        if any(v is None for v in vals) or not holds(*vals):
            broke.append(s)
    return len(seeds) - len(broke), len(seeds), broke


def support_text(k: int, n: int, broke: list[int]) -> str:
    if n < 2:
        return "; one seed, no spread to weigh it against"
    return f"; holds in {k} of {n} seeds" + (f" (seed {', '.join(map(str, broke))} broke it)" if broke else "")


def lr_range(c: dict) -> str:
    lo, hi = c.get("max_stable_lr_min"), c.get("max_stable_lr_max")
    return "?" if lo is None else f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}"


def apart(low: dict, high: dict) -> bool:
    """The seeds' frontiers of `high` all lie above those of `low`: a difference outside the spread."""
    a, b = low.get("max_stable_lr_max"), high.get("max_stable_lr_min")
    return a is not None and b is not None and b > a
