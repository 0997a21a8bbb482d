"""``treeffn bench mode=loss_curve``: masked vs Triton training of one small tree LM, same seed.

A self-contained pre-LN decoder (torch only, so it runs wherever the kernels run, without the
training stack's dependencies) trained four ways from one seed: masked bf16, triton bf16 (mode
auto), triton bf16 with the path-only kernels forced, masked fp32 (the size of bf16 noise).
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F


class TinyTreeLM(torch.nn.Module):
    """A small pre-LN decoder whose MLPs are TreeFFN layers: self-contained (torch only), so the
    comparison runs wherever the kernels run, without the training stack's dependencies."""

    def __init__(self, vocab, d, layers, heads, depth, trees, placement, impl, triton_mode="auto"):
        from treeffn.layers import TreeFFN

        super().__init__()
        self.heads, self.triton_mode = heads, triton_mode
        self.embed = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(1024, d)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(torch.nn.ModuleDict({
                "ln1": torch.nn.LayerNorm(d), "qkv": torch.nn.Linear(d, 3 * d), "proj": torch.nn.Linear(d, d),
                "ln2": torch.nn.LayerNorm(d), "ffn": TreeFFN(d, depth, trees, placement=placement, impl=impl),
            }))
        self.ln = torch.nn.LayerNorm(d)
        for m in self.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(m.weight, std=0.02)
            if hasattr(m, "track_stats"):
                m.track_stats = False

    def forward(self, ids):
        B, S = ids.shape
        h = self.embed(ids) + self.pos(torch.arange(S, device=ids.device))
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](h)).view(B, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, -1)
            h = h + blk["proj"](a)
            h = h + self._ffn(blk["ffn"], blk["ln2"](h))
        return F.linear(self.ln(h), self.embed.weight)

    def _ffn(self, ffn, x):
        """The tree layer; with a Triton mode other than auto, tree_ffn_triton in that mode."""
        if self.triton_mode == "auto":
            return ffn(x)
        from treeffn.kernels import tree_ffn_triton

        y, _ = tree_ffn_triton(x.reshape(-1, x.shape[-1]), ffn.w_in, ffn.b_in, ffn.w_out, ffn.trees, ffn.depth,
                               ffn.placement, ffn.activation, mode=self.triton_mode)
        return y.view(x.shape)


def run_loss_curve(args) -> dict:
    """Train one small tree LM three ways from one seed: masked bf16, triton bf16, masked fp32.

    Same initial weights and batches. The bf16-vs-fp32 gap shows the size of bf16 noise; the
    triton run should stay about as close to masked as that.
    """
    import tokenizers

    from treeffn.data.corpus import EMBEDDED_TOKENIZER, read_documents

    device = torch.device(args.device)
    tok = tokenizers.Tokenizer.from_file(str(EMBEDDED_TOKENIZER))
    text = "\n".join(doc["text"] for doc in read_documents("shakespeare")[:8])
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    block, batch = args.loss_block, args.loss_batch
    n_blocks = ids.numel() // (block + 1)
    blocks = ids[: n_blocks * (block + 1)].view(n_blocks, block + 1)
    shape = dict(d=256, layers=4, heads=4, depth=5, trees=16)  # 16 x 63 = 1008 nodes ~ ffn 1024
    curves = {}
    for label, impl, bf16 in (("masked-bf16", "masked", True), ("triton-bf16", "triton", True),
                              ("triton-gather-bf16", "triton", True), ("masked-fp32", "masked", False)):
        # triton-bf16 runs mode auto (the GEMM form at this batch); triton-gather forces the
        # path-only kernels in forward and backward.
        torch.manual_seed(args.seed)
        model = TinyTreeLM(tok.get_vocab_size(), placement=args.placement, impl=impl, **shape,
                           triton_mode="gather" if label == "triton-gather-bf16" else "auto").to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        gen = torch.Generator().manual_seed(args.seed)
        losses = []
        t0 = time.perf_counter()
        for _ in range(args.loss_curve):
            b = blocks[torch.randint(0, n_blocks, (batch,), generator=gen)].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(b[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), b[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        curves[label] = {"losses": losses, "wall_s": time.perf_counter() - t0}
        print(f"{label}: first {losses[0]:.4f}  last {losses[-1]:.4f}  ({curves[label]['wall_s']:.1f} s)", flush=True)
        del model, opt
    a, b, c = (curves[k]["losses"] for k in ("masked-bf16", "triton-bf16", "masked-fp32"))
    g = curves["triton-gather-bf16"]["losses"]
    tail = max(1, len(a) // 5)
    summary = {
        "max_abs_diff_triton_vs_masked": max(abs(p - q) for p, q in zip(a, b)),
        "max_abs_diff_triton_gather_vs_masked": max(abs(p - q) for p, q in zip(a, g)),
        "mean_last_triton_gather_bf16": statistics.mean(g[-tail:]),
        "max_abs_diff_bf16_vs_fp32": max(abs(p - q) for p, q in zip(a, c)),
        "mean_last_masked_bf16": statistics.mean(a[-tail:]), "mean_last_triton_bf16": statistics.mean(b[-tail:]),
        "mean_last_masked_fp32": statistics.mean(c[-tail:]), "steps": len(a), "tail_steps": tail,
        "loss_at (masked, triton, triton-gather, masked-fp32)": {
            str(i): [round(a[i], 4), round(b[i], 4), round(g[i], 4), round(c[i], 4)]
                    for i in sorted({0, len(a) // 4, len(a) // 2, 3 * len(a) // 4, len(a) - 1})},
    }
    print(json.dumps(summary, indent=1), flush=True)
    return {"loss_curve": {"curves": curves, "summary": summary, "model": shape, "placement": args.placement,
                           "batch": batch, "block": block}}
