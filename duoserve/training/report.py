"""Markdown and PNG figures for docs/models.md from training runs' JSON files.

    python -m duoserve.training.report RUN_DIR [RUN_DIR ...] --corpus .carry/corpus \
        --out-md docs/models.generated.md --fig-dir docs/figures [--fig-prefix figures]
    python -m duoserve.training.report RUN_DIR ... --summary     (a short table on stdout)

Each RUN_DIR holds ``train_log.json`` and ``eval.json`` written by ``train``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from duoserve.training.model import MoeConfig


def load_run(run_dir: Path) -> dict:
    """train_log.json and eval.json of one run, plus its name."""
    run = json.loads((run_dir / "train_log.json").read_text())
    run["eval"] = json.loads((run_dir / "eval.json").read_text())
    run["name"] = run["summary"]["preset"]
    return run


def summary_table(runs: list[dict]) -> str:
    """One markdown row per run: size, training, quality."""
    rows = [
        "| model | arch | layers x experts x top-k | hidden | params (active) | checkpoint "
        "| tokens (epochs) | train time | tokens/s | train loss | held-out ppl |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s, cfg = run["summary"], MoeConfig(**run["model_config"])
        params = f"{cfg.num_params / 1e6:.1f}M ({cfg.num_active_params / 1e6:.1f}M)"
        tokens = f"{s['tokens_seen'] / 1e6:.1f}M ({s['epochs']:.1f})"
        rows.append(
            f"| {run['name']} | {cfg.family} | {cfg.num_layers} x {cfg.num_experts} x {cfg.top_k} "
            f"| {cfg.hidden_size} | {params} | {s['checkpoint_bytes'] / 1e6:.1f} MB | {tokens} "
            f"| {s['train_minutes']:.1f} min | {s['tokens_per_s'] / 1e3:.0f}k "
            f"| {s['final_train_loss'] or math.nan:.3f} | {run['eval']['heldout_perplexity']:.1f} |"
        )
    return "\n".join(rows)


def routing_table(runs: list[dict]) -> str:
    """Routing statistics (means over layers) next to uniform random routing."""
    rows = [
        "| model | load entropy (uniform) | busiest expert x E | consecutive-token overlap "
        "(uniform) | next layer via co-occurrence | via gate lookahead | via popularity "
        "| uniform | exact set / half right (co-occ.) | uniform |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        r = run["eval"]["routing"]
        mean, uni = r["mean"], r["uniform"]
        cooc = mean["next_layer_cooccurrence"]
        rows.append(
            f"| {run['name']} | {mean['load_entropy']:.3f} ({uni['load_entropy']:.3f}) "
            f"| {mean['max_load_x_experts']:.2f} "
            f"| {mean['consecutive_overlap']:.3f} ({uni['consecutive_overlap']:.3f}) "
            f"| {cooc['hit_fraction']:.1%} "
            f"| {mean['next_layer_gate_lookahead']['hit_fraction']:.1%} "
            f"| {mean['next_layer_popularity']['hit_fraction']:.1%} "
            f"| {uni['next_layer']['hit_fraction']:.1%} "
            f"| {cooc['exact_rate']:.1%} / {cooc['half_rate']:.1%} "
            f"| {uni['next_layer']['exact_rate']:.2%} / {uni['next_layer']['half_rate']:.1%} |"
        )
    return "\n".join(rows)


def plot_loss_curves(runs: list[dict], path: Path) -> None:
    """Train and validation loss against tokens, one panel per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for key, label in (("train_loss", "train"), ("heldout_loss", "validation")):
            points = [(r["tokens"] / 1e6, r[key]) for r in run["records"] if key in r]
            if points:
                ax.plot(*zip(*points), label=label, marker="." if key == "heldout_loss" else None)
        ax.set_title(run["name"])
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _next_layer_value(stats: dict, uniform: dict) -> float:
    if "next_layer_cooccurrence" not in stats:
        return math.nan
    return stats["next_layer_cooccurrence"]["hit_fraction"] / uniform["next_layer"]["hit_fraction"]


def plot_routing(runs: list[dict], path: Path) -> None:
    """Per-layer routing statistics relative to uniform random routing (1.0 = uniform)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("load entropy / log E", lambda s, u: s["load_entropy"] / u["load_entropy"]),
        (
            "consecutive overlap / uniform",
            lambda s, u: s["consecutive_overlap"] / u["consecutive_overlap"],
        ),
        ("next-layer hit (co-occurrence) / uniform", _next_layer_value),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 3.6))
    for ax, (title, value) in zip(axes, panels):
        for run in runs:
            r = run["eval"]["routing"]
            points = [(s["layer"], value(s, r["uniform"])) for s in r["layers"]]
            points = [p for p in points if not math.isnan(p[1])]
            ax.plot(*zip(*points), label=run["name"], marker=".")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def samples_markdown(runs: list[dict]) -> str:
    """Greedy and sampled continuations of each prompt, per run."""
    parts = []
    for run in runs:
        parts.append(f"### {run['name']}\n")
        for sample in run["eval"]["samples"]:
            parts.append(f"Prompt: `{sample['prompt']!r}`\n")
            for kind in ("greedy", "sampled"):
                text = sample[kind].rstrip().replace("```", "'''")
                parts.append(f"{kind}:\n\n```text\n{sample['prompt']}{text}\n```\n")
    return "\n".join(parts)


def corpus_markdown(corpus_dir: Path) -> str:
    """One paragraph on the corpus from corpus.json."""
    meta = json.loads((corpus_dir / "corpus.json").read_text())
    return (
        f"Corpus: {meta['name']} from Debian package `{meta['package']}` {meta['version']} "
        f"(license {meta['license']}); {meta['num_train_docs']} train documents plus "
        f"{meta['num_train_chat_examples']} chat-formatted section excerpts "
        f"({meta['train_bytes'] / 1e6:.1f} MB, {meta.get('train_tokens', 0) / 1e6:.2f}M tokens), "
        f"{meta['num_heldout_docs']} held-out documents ({meta['heldout_bytes'] / 1e6:.2f} MB, "
        f"{meta.get('heldout_tokens', 0) / 1e3:.0f}k tokens; first half validation, second "
        f"half test). Tokenizer: byte-level BPE, {meta.get('vocab_size', '?')} tokens."
    )


def write_report(runs: list[dict], corpus_dir: Path | None, md_path: Path, fig_dir: Path,
                 fig_prefix: str) -> None:  # fmt: skip
    """Write the markdown file and its two PNG figures."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    plot_loss_curves(runs, fig_dir / "loss_curves.png")
    plot_routing(runs, fig_dir / "routing_per_layer.png")
    device = runs[0]["summary"]["device"] if runs else "?"
    parts = [
        "## Trained models",
        corpus_markdown(corpus_dir) if corpus_dir else "",
        f"Measured on: {device}. Perplexity is on the held-out test half.",
        summary_table(runs),
        "## Loss curves",
        f"![loss curves]({fig_prefix}/loss_curves.png)",
        "## Routing against uniform random routing",
        "Held-out tokens; means over layers. Next-layer columns: mean fraction of layer "
        "l+1's top-k set predicted from layer l (co-occurrence table fitted on the first "
        "half of the tokens, scored on the second), from layer l+1's router applied to the "
        "residual stream after layer l (gate lookahead), or by the K most-used experts.",
        routing_table(runs),
        f"![routing per layer]({fig_prefix}/routing_per_layer.png)",
        "## Sample generations",
        samples_markdown(runs),
    ]
    md_path.write_text("\n\n".join(p for p in parts if p) + "\n")


def main() -> None:
    """CLI: report or summary table."""
    parser = argparse.ArgumentParser(description="Report on trained MoE models.")
    parser.add_argument("runs", type=Path, nargs="+", help="run folders")
    parser.add_argument("--corpus", type=Path, default=None)
    parser.add_argument("--out-md", type=Path, default=None)
    parser.add_argument("--fig-dir", type=Path, default=Path("docs/figures"))
    parser.add_argument("--fig-prefix", default="figures", help="image path as seen from the md")
    parser.add_argument("--summary", action="store_true", help="print the tables only")
    args = parser.parse_args()
    runs = [load_run(r) for r in args.runs if (r / "eval.json").exists()]
    missing = [str(r) for r in args.runs if not (r / "eval.json").exists()]
    if missing:
        print(f"skipped (no eval.json): {', '.join(missing)}")
    if args.summary or args.out_md is None:
        print(summary_table(runs))
        print()
        print(routing_table(runs))
    if args.out_md is not None:
        write_report(runs, args.corpus, args.out_md, args.fig_dir, args.fig_prefix)
        print(f"wrote {args.out_md} and figures in {args.fig_dir}")


if __name__ == "__main__":
    main()
