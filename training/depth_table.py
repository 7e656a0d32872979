"""docs/training.md's depth table, computed: parameters, Chinchilla tokens and expected 8×H100 base-training time.

    python -m training.depth_table                  # markdown, depths 4..32
    python -m training.depth_table --mfu 0.5 --depths 12,20,26

Parameters are counted on the real GPT built on the meta device (no memory). Tokens follow nanochat's
rule of 20 tokens per parameter. Time = FLOPs / (GPUs × peak × MFU), with nanochat's FLOP estimate per
token, 6 × (parameters − embedding) + 12 × layers × heads × head_dim × sequence_len (the second term
is attention's QKᵀ and AV), and the H100 SXM dense bf16 peak of 989 TFLOP/s. MFU is an assumption
(default 40%); the table says which one it used. Base training only: mid, SFT and RL add a little.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.common import parse_config

H100_BF16_PEAK = 989e12


@dataclass
class DepthTableConfig:
    depths: str = "4,8,12,16,20,24,26,32"
    vocab_size: int = 65536
    seq_len: int = 2048
    tokens_per_param: float = 20.0
    total_batch_tokens: int = 524288
    gpus: int = 8
    mfu: float = 0.40


def depth_row(depth: int, config: DepthTableConfig) -> dict:
    import torch

    from aquainterp.model.gpt import GPT, GPTConfig

    gpt_config = GPTConfig.from_depth(depth, vocab_size=config.vocab_size, sequence_len=config.seq_len)
    with torch.device("meta"):
        model = GPT(gpt_config)
    params = model.num_params()
    embedding = model.wte.weight.numel()
    c = gpt_config
    flops_per_token = 6 * (params - embedding) + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len
    tokens = config.tokens_per_param * params
    seconds = flops_per_token * tokens / (config.gpus * H100_BF16_PEAK * config.mfu)
    return {"depth": depth, "width": c.n_embd, "heads": c.n_head, "params": params, "tokens": tokens,
            "steps": round(tokens / config.total_batch_tokens), "flops_per_token": flops_per_token,
            "hours": seconds / 3600}


def markdown(rows: list[dict], config: DepthTableConfig) -> str:
    lines = [f"Base training at {config.tokens_per_param:g} tokens/parameter, vocab {config.vocab_size:,}, "
             f"sequence {config.seq_len}, {config.gpus}×H100 at an assumed {config.mfu:.0%} MFU "
             f"(`python -m training.depth_table`).", "",
             "| depth | width | heads | parameters | tokens | steps (524k tok) | 8×H100 hours |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['width']} | {r['heads']} | {r['params'] / 1e6:,.1f}M | "
                     f"{r['tokens'] / 1e9:,.2f}B | {r['steps']:,} | {r['hours']:.2f} |")
    return "\n".join(lines)


def run(config: DepthTableConfig) -> list[dict]:
    depths = [int(d) for d in config.depths.split(",") if d.strip()]
    if not 0 < config.mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {config.mfu}")
    rows = [depth_row(d, config) for d in depths]
    print(markdown(rows, config))
    return rows


def main(argv: list[str] | None = None) -> None:
    run(parse_config(DepthTableConfig, argv, __doc__.split("\n")[0], prog="python -m training.depth_table"))


if __name__ == "__main__":
    main()
