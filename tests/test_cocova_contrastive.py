"""CoCoVa's contrastive negatives: with one segment per step, InfoNCE against a queue of past segments (and, on two
processes, the other process's segments), recomputed inline on tiny tensors; the gradient reaches the local thought;
a segment is never its own negative; a full training forward with one segment is non-zero."""

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from vlatent.data import load_records
from vlatent.methods import create_method
from vlatent.model import LatentVLM

from test_model import write_records

TINY = dict(num_latent_tokens=4, lq_hidden_size=32, lq_heads=4, lq_layers=1, num_queries=4, num_iterations=2,
            num_selected=8, contrastive_dim=16, recon_size=16, unet_channels=[16, 32], unet_norm_groups=8,
            diffusion_steps=100)
H = 24  # the LM width the method is built for: any will do here


def tiny_method(**overrides):
    torch.manual_seed(0)
    return create_method("cocova", H, {**TINY, **overrides}).train()


def views(n, seed=1):
    """n segments' mean-pooled views (thought (n, d), visual (n, H), text (n, H)) and keys 1..n."""
    g = torch.Generator().manual_seed(seed)
    d = TINY["lq_hidden_size"]
    return (torch.randn(n, d, generator=g), torch.randn(n, H, generator=g), torch.randn(n, H, generator=g),
            torch.arange(1, n + 1, dtype=torch.float64))


def inline_info_nce(m, thought, visual, text, anchors, excluded=()):
    """Symmetric InfoNCE written out: rows ``anchors`` of the pool are the positives of this process's segments, every
    pool row but the ``excluded`` (anchor, row) pairs a candidate; each view centred over the whole pool."""
    pool = {}
    for name, x, proj in (("t", thought, m.thought_proj), ("v", visual, m.visual_proj), ("x", text, m.text_proj)):
        x = x - x.sum(0) / x.shape[0]
        pool[name] = F.normalize(x @ proj.weight.T, dim=-1)
    scale, total = m.logit_scale.exp(), 0.0
    for other in ("v", "x"):
        for a, b in (("t", other), (other, "t")):
            for i in anchors:
                rows = [j for j in range(thought.shape[0]) if (i, j) not in excluded]
                sims = torch.stack([scale[0] * (pool[a][i] * pool[b][j]).sum() for j in rows])
                total = total - (sims[rows.index(i)] - torch.logsumexp(sims, 0)) / (len(anchors) * 4)
    return total


def test_one_segment_is_infonce_against_the_queue(tmp_path):
    """Batch 1: the first step has no negative (0); then the queue's past segments are the negatives, newest first,
    at most ``contrastive_queue``, the anchor's own earlier view excluded; the loss reaches the thought."""
    m = tiny_method(contrastive_queue=3)
    thought, visual, text, keys = views(5)
    first = m.contrastive_loss(thought[:1], visual[:1], text[:1], keys[:1])
    assert first.item() == 0.0  # one segment and nothing queued: the degenerate case the queue is for
    for i in range(1, 4):
        m.contrastive_loss(thought[i:i + 1], visual[i:i + 1], text[i:i + 1], keys[i:i + 1])
    assert m.queue[:, -1].tolist() == [4.0, 3.0, 2.0]  # newest first, segment 1 pushed out

    anchor = thought[4:5].clone().requires_grad_()
    loss = m.contrastive_loss(anchor, visual[4:5], text[4:5], keys[2:3])  # segment 3's record, seen again
    pool = [4, 3, 2, 1]  # this step's row, then the queue (keys 4, 3, 2)
    with torch.no_grad():
        expected = inline_info_nce(m, thought[pool], visual[pool], text[pool], anchors=[0], excluded={(0, 2)})
    assert loss > 0
    torch.testing.assert_close(loss, expected.float(), atol=1e-5, rtol=1e-4)
    loss.backward()
    assert anchor.grad is not None and anchor.grad.abs().sum() > 0
    assert m.thought_proj.weight.grad.abs().sum() > 0 and m.logit_scale.grad.abs().sum() > 0
    assert m.queue[:, -1].tolist() == [3.0, 4.0, 2.0]  # the segment's older view replaced by this one

    m.eval()
    before = m.queue.clone()
    m.contrastive_loss(thought[:1], visual[:1], text[:1], keys[:1])
    assert torch.equal(m.queue, before)  # evaluation reads the queue, never fills it


def test_training_forward_with_one_segment_is_nonzero(tiny_base, tmp_path):
    """A real forward on batches of one record with one segment each: 0 at the first step (nothing queued), then
    non-zero, with a gradient into the LQ-Former through the contrastive term alone."""
    records = load_records(write_records(tmp_path, [("a", 1, True), ("b", 1, True), ("c", 1, True)]))
    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(tiny_base, method="cocova", **TINY).train()
    collate = model.collator()
    assert model(collate(records[:1])).losses["contrastive"].item() == 0.0
    model(collate(records[1:2]))
    model.zero_grad()
    contrastive = model(collate(records[2:3])).losses["contrastive"]
    assert contrastive > 0
    contrastive.backward()
    assert model.method.lq_former.queries.grad.abs().sum() > 0
    model.zero_grad()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(rank):
    """One rank of the gather test: one segment each, gathered; then rank 1 has none and still joins the gather."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        m = tiny_method(contrastive_queue=0)  # the same weights on both ranks
        thought, visual, text, keys = views(2)
        mine = slice(rank, rank + 1)
        anchor = thought[mine].clone().requires_grad_()
        loss = m.contrastive_loss(anchor, visual[mine], text[mine], keys[mine], gather=True)
        with torch.no_grad():
            expected = inline_info_nce(m, thought, visual, text, anchors=[rank])
        assert loss > 0, loss
        torch.testing.assert_close(loss, expected.float(), atol=1e-5, rtol=1e-4)
        loss.backward()
        assert anchor.grad is not None and anchor.grad.abs().sum() > 0
        if rank == 0:
            alone = m.contrastive_loss(thought[:1], visual[:1], text[:1], keys[:1], gather=True)
            assert alone.item() == 0.0  # the other rank had no segment to offer
        else:
            empty = thought[:0]
            assert m.contrastive_loss(empty, visual[:0], text[:0], keys[:0], gather=True) is None
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_gather_each_others_segments(monkeypatch):
    """Two gloo processes, one segment each: each one's InfoNCE has the other's segment as its negative (inline
    recomputation over both), its own thought keeps the gradient, and a process without segments still gathers."""
    import torch.multiprocessing as mp

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_two_processes, nprocs=2, join=True)
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"
