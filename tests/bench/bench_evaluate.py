"""Benchmark of the evaluation pass: `esa.evaluate.evaluate` against the flattened-batch loss it replaced.

    python tests/bench/bench_evaluate.py [--model gemma3-270m] [--windows 8] [--seqlen 256] [--repeats 3]

evaluate() takes the loss one window of a batch at a time, so the (B, T-1, V) logits are never copied
(Gemma's 262k vocabulary makes that copy about 1 GB per batch). The reference is the same forward followed
by cross-entropy over `logits[:, :-1].reshape(-1, V)`. Both run on the same model and tokens, interleaved,
and the best of `--repeats` is kept; the results must agree bit for bit (recorded as `identical`).
Writes reports/bench/evaluate-<model>.json.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from esa.evaluate import auto_batch_size, evaluate
from esa.models import load
from esa.store import REPO_ROOT, write_json


@torch.no_grad()
def flattened(model: torch.nn.Module, ids: torch.Tensor, bs: int) -> torch.Tensor:
    """Per-window NLL sums by the flattened-batch formula."""
    out = torch.zeros(ids.shape[0], dtype=torch.float64)
    for start in range(0, ids.shape[0], bs):
        batch = ids[start : start + bs]
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        out[start : start + bs] = nll.view(targets.shape).double().sum(dim=1)
        (logits.argmax(-1) == targets).sum()  # the accuracy pass evaluate() also makes
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    lm = load(a.model)
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (a.windows, a.seqlen), generator=torch.Generator().manual_seed(0))
    bs = auto_batch_size(a.seqlen, vocab)
    ours, ref = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        res = evaluate(lm.model, ids, batch_size=bs, show_progress=False)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sums = flattened(lm.model, ids, bs)
        ref.append(time.perf_counter() - t0)
    identical = res.window_nll == (sums / (a.seqlen - 1)).tolist()
    out = dict(model=a.model, vocab=vocab, windows=a.windows, seqlen=a.seqlen, batch_size=bs,
               threads=torch.get_num_threads(), evaluate_s=min(ours), flattened_s=min(ref),
               ratio=min(ours) / min(ref), identical=identical, all_evaluate_s=ours, all_flattened_s=ref)
    write_json(REPO_ROOT / "reports" / "bench" / f"evaluate-{a.model}.json", out)
    print(out)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
