"""Loss normalisers across ranks: two gloo processes, each with half the batch, train as one.

DDP averages the gradients of the ranks' losses. A loss normalised by a count (boxes,
positives, centerness sum) is only the whole batch's loss if that count is the batch's, not the
rank's: `SetCriterion` divides by `_global_count` (the mean over ranks of the local gt and
positive-query counts) and `atss_losses` by `_mean_over_ranks` (positives and centerness sum).
With those, the mean over ranks of the per-rank losses equals the one-process loss of the whole
batch, and each rank's input gradient, divided by the world size as DDP does, equals the
one-process gradient of its rows. The halves hold different numbers of gts, so a normaliser that
forgot the reduction or the division by the world size fails (checked below: the per-rank
losses without communication do not average to the whole-batch loss).

Tolerance: float32 sums of the same terms in a different order, 1e-5 relative.
"""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from codetr.losses import HungarianMatcher, SetCriterion
from codetr.losses.atss_loss import atss_losses
from codetr.model.atss_head import grid_anchors

WORLD = 2
PER_RANK = 2  # images per rank
C = 5  # classes
STRIDES = [8, 16, 32]
PADDED = 96  # padded image side (feature maps PADDED / stride)
GT_COUNTS = [4, 3, 1, 0]  # rank 0 holds 7 gts, rank 1 one: the local and global counts differ


def _criterion() -> SetCriterion:
    return SetCriterion(num_classes=C, matcher=HungarianMatcher(2.0, 5.0, 2.0, 0.25),
                        cls_loss_coef=2.0, bbox_loss_coef=5.0, giou_loss_coef=2.0,
                        focal_alpha=0.25, loss_types=["labels", "boxes"], aux_loss=True,
                        interm_loss_coef=1.0, no_interm_box_loss=False)


def _boxes(*shape) -> torch.Tensor:
    """Random cxcywh boxes inside the unit square."""
    return torch.cat([torch.rand(*shape, 2) * 0.5 + 0.25, torch.rand(*shape, 2) * 0.3 + 0.05], -1)


def _batch(gen_seed: int) -> dict:
    """A whole batch of `WORLD * PER_RANK` images: query-head outputs (main, 2 aux, encoder
    proposals, one co-head's positive queries: `pred_logits` `[B, Q, C]`, `pred_boxes` `[B, Q, 4]`
    cxcywh), ATSS head maps (per level `[B, C | 4 | 1, H_l, W_l]`) and B targets. Tensors only,
    so it loads with `weights_only=True` in the workers.

    Rank 1's images differ from rank 0's by construction, so that a mean of per-rank means is
    not the batch mean whatever the seed: fewer gts (`GT_COUNTS`) and positive queries (6 and 5
    against 2 and 1), logits 3x larger, gts left of every predicted box, ATSS centerness logits
    shifted."""
    torch.manual_seed(gen_seed)
    b = WORLD * PER_RANK
    worse = torch.tensor([0.0] * PER_RANK + [1.0] * PER_RANK)  # [B]: 1 on rank 1's images
    scale = (1 + 2 * worse).view(b, 1, 1)

    def group(q):
        boxes = _boxes(b, q)
        boxes[..., 0] = boxes[..., 0] + 0.15 * worse.view(b, 1)  # cx: rank 1 further off
        return {"pred_logits": torch.randn(b, q, C) * scale, "pred_boxes": boxes}

    pos_labels = torch.full((b, 7), C)  # background slots
    for row, count in enumerate((6, 5, 2, 1)):
        pos_labels[row, :count] = torch.randint(0, C, (count,))
    sizes = [(96, 80), (72, 96), (96, 96), (80, 64)]
    targets = []
    for image, (n, (h, w)) in enumerate(zip(GT_COUNTS, sizes)):
        xy = torch.rand(n, 2) * 0.5 + 0.2
        wh = torch.rand(n, 2) * 0.25 + 0.1
        if worse[image]:  # left of every predicted centre: rank 1's matched boxes are worse
            xy[:, 0], wh[:, 0] = 0.12, torch.rand(n) * 0.1 + 0.1
        targets.append({"labels": torch.randint(0, C, (n,)), "boxes": torch.cat([xy, wh], 1),
                        "size": torch.tensor([h, w])})
    maps = [(PADDED // s, PADDED // s) for s in STRIDES]
    return {
        "query": {**group(6), "aux_outputs": [group(6), group(6)], "interm_outputs": group(6),
                  "pos_outputs": [{"layers": [group(7), group(7)],
                                   "targets": {"labels": pos_labels, "boxes": _boxes(b, 7)}}]},
        "atss": {"cls": [torch.randn(b, C, *hw) * scale[..., None] for hw in maps],
                 "deltas": [torch.randn(b, 4, *hw) * 0.3 for hw in maps],
                 "ctr": [torch.randn(b, 1, *hw) + 5 * worse.view(b, 1, 1, 1) for hw in maps]},
        "targets": targets,
    }


def _predictions(tree) -> list:
    """Every `pred_logits` / `pred_boxes` tensor of a query-head output dict, in a fixed order."""
    if isinstance(tree, dict):
        return [t for k in sorted(tree) for t in
                ([tree[k]] if k in ("pred_logits", "pred_boxes") else _predictions(tree[k]))]
    if isinstance(tree, list):
        return [t for item in tree for t in _predictions(item)]
    return []


def _slice(tree, rows: slice):
    """The same nested structure with every tensor cut to the batch rows `rows`."""
    if isinstance(tree, torch.Tensor):
        return tree[rows].clone()
    if isinstance(tree, dict):
        return {k: _slice(v, rows) for k, v in tree.items()}
    return [_slice(item, rows) for item in tree]


def _rows_of(batch: dict, rows: slice) -> dict:
    """The images `rows` of `batch` (targets are a list over images, the rest batched)."""
    return {"query": _slice(batch["query"], rows), "atss": _slice(batch["atss"], rows),
            "targets": batch["targets"][rows]}


def _losses_and_grads(batch: dict) -> tuple[dict, list]:
    """Every criterion and ATSS loss of `batch`, and the gradient of their sum w.r.t. each
    prediction tensor (`_predictions` of `batch["query"]`, then the ATSS maps)."""
    query, atss = batch["query"], batch["atss"]
    preds = _predictions(query) + [m for k in ("cls", "deltas", "ctr") for m in atss[k]]
    for tensor in preds:
        tensor.requires_grad_(True)
    losses = _criterion()(query, batch["targets"])
    anchors = grid_anchors([(PADDED // s, PADDED // s) for s in STRIDES], STRIDES, 8)
    atss_terms, _ = atss_losses(atss["cls"], atss["deltas"], atss["ctr"], anchors,
                                batch["targets"], num_classes=C)
    losses.update({f"atss_{k}": v for k, v in atss_terms.items()})
    grads = torch.autograd.grad(sum(losses.values()), preds)
    return {k: v.detach() for k, v in losses.items()}, list(grads)


def _rank_rows(rank: int) -> slice:
    return slice(rank * PER_RANK, (rank + 1) * PER_RANK)


def _worker(rank: int, batch_file: str, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        batch = torch.load(batch_file, weights_only=True)
        losses, grads = _losses_and_grads(_rows_of(batch, _rank_rows(rank)))
        torch.save({"losses": losses, "grads": grads}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _split_without_communication(batch: dict) -> dict:
    """Mean over the halves of their losses, each half normalised by its own counts."""
    halves = [_losses_and_grads(_rows_of(batch, _rank_rows(r)))[0] for r in range(WORLD)]
    return {k: sum(h[k] for h in halves) / WORLD for k in halves[0]}


def test_ranks_with_half_batches_reproduce_the_whole_batch_losses_and_gradients(tmp_path):
    seed = int(torch.randint(2**31, ()))
    batch = _batch(seed)
    batch_file = tmp_path / "batch.pt"
    torch.save(batch, batch_file)
    mp.spawn(_worker, args=(str(batch_file), str(tmp_path / "init"), str(tmp_path)),
             nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    whole_losses, whole_grads = _losses_and_grads(_rows_of(batch, slice(None)))
    assert set(ranks[0]["losses"]) == set(whole_losses)
    assert {"loss_ce_pos0_1", "loss_bbox_interm", "atss_loss_bbox"} <= set(whole_losses)
    for name, whole in whole_losses.items():
        mean = sum(r["losses"][name] for r in ranks) / WORLD
        torch.testing.assert_close(mean, whole, rtol=1e-5, atol=1e-7, msg=f"{name} (seed {seed})")
    for rank, result in enumerate(ranks):
        assert len(result["grads"]) == len(whole_grads)
        for k, (got, whole) in enumerate(zip(result["grads"], whole_grads)):
            torch.testing.assert_close(got / WORLD, whole[_rank_rows(rank)], rtol=1e-5,
                                       atol=1e-8, msg=f"rank {rank} gradient {k} (seed {seed})")

    # The test can fail: normalising each half by its own counts gives different losses (gap
    # >= 359x the 1e-3 asked over 700 seeds). Not loss_bbox: it shares loss_ce's normaliser,
    # and its gap scales with the halves' per-box L1 difference, which a draw can make ~0.
    local = _split_without_communication(batch)
    for name in ("loss_ce", "loss_ce_pos0_1", "atss_loss_cls", "atss_loss_centerness"):
        assert not torch.allclose(local[name], whole_losses[name], rtol=1e-3), f"{name} (seed {seed})"
