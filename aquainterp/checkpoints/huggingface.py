"""Our GPT ⇄ a Hugging Face `NanoChatForCausalLM` directory, and TransformerLens's TransformerBridge on it.

HF's NanoChat port computes nanochat's math (same rotary sign convention, QK-norm after rotary, ReLU²,
weightless RMSNorm, soft-cap 15), so the export is a renaming of tensors, no permutation. The one knob
to set is the RMSNorm eps: nanochat uses torch's default (float32 machine epsilon), HF's default is 1e-6,
so we write ours into config.json. `load_transformer_bridge` on an exported directory giving our logits
is the proof that our hook points mean what TransformerLens's mean.

Weights go through safetensors only (no pickles).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from aquainterp.model.gpt import GPT, ROPE_BASE, SOFTCAP, GPTConfig

NANOCHAT_EPS = torch.finfo(torch.float32).eps

# (our name pattern, HF name pattern); {l} is the layer index.
_NAME_MAP = [
    ("wte.weight", "model.embed_tokens.weight"),
    ("blocks.{l}.attn.c_q.weight", "model.layers.{l}.self_attn.q_proj.weight"),
    ("blocks.{l}.attn.c_k.weight", "model.layers.{l}.self_attn.k_proj.weight"),
    ("blocks.{l}.attn.c_v.weight", "model.layers.{l}.self_attn.v_proj.weight"),
    ("blocks.{l}.attn.c_proj.weight", "model.layers.{l}.self_attn.o_proj.weight"),
    ("blocks.{l}.mlp.c_fc.weight", "model.layers.{l}.mlp.fc1.weight"),
    ("blocks.{l}.mlp.c_proj.weight", "model.layers.{l}.mlp.fc2.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


def _rename(name: str, to_hf: bool) -> str:
    for ours, theirs in _NAME_MAP:
        src, dst = (ours, theirs) if to_hf else (theirs, ours)
        match = re.fullmatch(re.escape(src).replace(r"\{l\}", r"(\d+)"), name)
        if match:
            return dst.replace("{l}", match.group(1)) if match.groups() else dst
    raise KeyError(f"no {'HF' if to_hf else 'aquainterp'} name for tensor {name!r}")


def hf_config_dict(
    config: GPTConfig, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> dict:
    """config.json contents of the NanoChatForCausalLM equivalent to `config`."""
    return {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.d_mlp,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "rms_norm_eps": NANOCHAT_EPS if config.norm_eps is None else config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "final_logit_softcapping": SOFTCAP,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
        "dtype": "float32",
    }


def hf_unsupported(config: GPTConfig) -> list[str]:
    """The features of `config` that HF NanoChatForCausalLM (and so TransformerBridge) cannot compute."""
    if not config.is_2026:
        return []
    return [f"sliding windows (window_pattern {config.window_pattern!r})", "q/k x1.2 after QK-norm",
            "resid_lambdas/x0_lambdas", "value embeddings (value_embeds, ve_gate)", "smear", "backout"]


def export_hf(model: GPT, tokenizer, out_dir) -> Path:
    """Write `model` (+ `tokenizer`, if given) as an HF NanoChatForCausalLM directory; returns it.

    Files: config.json, model.safetensors (fp32), and with a tokenizer its tokenizer.json (from
    Tokenizer.save) plus a tokenizer_config.json so AutoTokenizer can load it. Vocabulary padding rows
    are left out (they are never read). A nanochat-2026-07 model is refused: HF's NanoChat has none of
    its additions. bf16 rotary tables (nanochat 2c4473d) export as HF's fp32 ones, the exact math."""
    if not isinstance(model, GPT):
        raise TypeError(f"export_hf: model must be an aquainterp GPT, got {type(model).__name__}")
    missing = hf_unsupported(model.config)
    if missing:
        raise ValueError(f"export_hf: HF NanoChatForCausalLM cannot represent this {model.config.architecture} "
                         f"model; it lacks {', '.join(missing)} (export --format nanochat keeps them)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bos = eos = None
    if tokenizer is not None:
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"export_hf: tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{model.config.vocab_size}"
            )
        tokenizer.save(out)
        bos = tokenizer.bos_token_id
        from aquainterp.tokenizer import HF_SPECIAL_TOKENS  # the same names as model.tokenizer's

        eos = tokenizer.encode_special(HF_SPECIAL_TOKENS["eos_token"])
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **HF_SPECIAL_TOKENS,
            "add_bos_token": False,
            "model_max_length": model.config.sequence_len,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config_dict(model.config, bos, eos), indent=2) + "\n")
    vocab = model.config.vocab_size
    tensors = {
        _rename(k, to_hf=True): v.detach()[:vocab if k in ("wte.weight", "lm_head.weight") else None]
        .to("cpu", torch.float32).contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _config_from_hf(cfg: dict, where: Path) -> GPTConfig:
    """GPTConfig from an HF config.json (any intermediate_size, rope_theta and rms_norm_eps), refusing
    anything our model cannot compute."""

    def need(key, expected, default=None):
        value = cfg.get(key, default)
        if value != expected:
            raise ValueError(f"{where}: {key} = {value!r}, aquainterp's GPT needs {expected!r}")

    need("model_type", "nanochat")
    need("hidden_act", "relu2", "relu2")
    need("final_logit_softcapping", SOFTCAP, SOFTCAP)
    need("attention_bias", False, False)
    need("tie_word_embeddings", False, False)
    rope = cfg.get("rope_parameters") or {"rope_type": "default", "rope_theta": cfg.get("rope_theta", ROPE_BASE)}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default" or \
            set(rope) - {"rope_type", "rope_theta", "partial_rotary_factor"} or \
            rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: rope_parameters = {rope!r}; aquainterp's GPT computes the default rotary "
                         "embedding only (any rope_theta)")
    try:
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if cfg.get("head_dim") not in (None, hidden // heads):
            raise ValueError(f"{where}: head_dim = {cfg['head_dim']}, aquainterp's GPT needs hidden_size/heads = "
                             f"{hidden // heads}")
        intermediate = cfg.get("intermediate_size", 8192)  # HF NanoChatConfig's default
        eps = cfg.get("rms_norm_eps", 1e-6)  # HF NanoChatConfig's default
        return GPTConfig(
            sequence_len=cfg.get("max_position_embeddings", 2048),
            vocab_size=cfg["vocab_size"],
            n_layer=cfg["num_hidden_layers"],
            n_head=heads,
            n_kv_head=cfg.get("num_key_value_heads") or heads,
            n_embd=hidden,
            rope_base=rope.get("rope_theta", ROPE_BASE),
            mlp_hidden=None if intermediate == 4 * hidden else intermediate,
            norm_eps=None if eps == NANOCHAT_EPS else eps,
        )
    except KeyError as e:
        raise ValueError(f"{where}: config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        if str(e).startswith(str(where)):
            raise
        raise ValueError(f"{where}: {e}") from None


def _hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards named by model.safetensors.index.json (HF's sharded layout)."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"import_hf: {index} is not a safetensors index (no weight_map: {e})") from None
        if any(Path(s).name != s for s in shards):
            raise ValueError(f"import_hf: {index} names shard files outside {directory}")
        files = [directory / s for s in shards]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"import_hf: shards {absent} named in {index.name} are missing from {directory}")
    else:
        raise FileNotFoundError(f"import_hf: {directory} has neither model.safetensors nor "
                                "model.safetensors.index.json (expected a NanoChatForCausalLM dir)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(f))
        twice = sorted(set(part) & set(state))
        if twice:
            raise ValueError(f"import_hf: tensors {twice[:3]} appear in more than one shard ({f.name})")
        state.update(part)
    if index.is_file() and not single.is_file():
        listed = set(weight_map)
        if listed != set(state):
            raise ValueError(f"import_hf: {index.name} and its shards disagree on tensors "
                             f"{sorted(listed ^ set(state))[:5]}")
    return state


def import_hf(directory) -> GPT:
    """Read an HF NanoChatForCausalLM directory (config.json + model.safetensors, or sharded
    model-0000X-of-0000N.safetensors + model.safetensors.index.json) into our GPT; a tokenizer.json written
    by export_hf (our Tokenizer) is attached to it."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"import_hf: {config_path} not found (expected an exported NanoChatForCausalLM dir)")
    config = _config_from_hf(json.loads(config_path.read_text()), config_path)
    from aquainterp.checkpoints.guard import check_bounds

    check_bounds(config.to_dict(), str(config_path))  # sizes within limits before anything is allocated
    hf_state = _hf_weights(directory)
    unknown = []
    state = {}
    for name, tensor in hf_state.items():
        try:
            state[_rename(name, to_hf=False)] = tensor
        except KeyError:
            unknown.append(name)
    if unknown:
        where = directory / "model.safetensors" if (directory / "model.safetensors").is_file() else directory
        raise ValueError(f"import_hf: {where} has tensors NanoChat does not define: {sorted(unknown)}")
    model = GPT(config)
    single = directory / "model.safetensors"
    model.load_state_dict_checked(state, source=str(single if single.is_file() else directory))
    if (directory / "tokenizer.json").is_file():  # as load_model: model.to_tokens, string input (TL's calls)
        from aquainterp.tokenizer import Tokenizer

        try:
            model.set_tokenizer(Tokenizer.load(directory))
        except ValueError as e:
            warnings.warn(f"import_hf: tokenizer not attached ({e}); model.set_tokenizer(...) attaches one",
                          stacklevel=2)
    return model.eval()


def load_transformer_bridge(directory, device: str | None = None, dtype: torch.dtype = torch.float32):
    """TransformerLens's TransformerBridge over an exported directory, loaded from local files only.

    Without tokenizer files in the directory the bridge gets a byte-free stand-in tokenizer whose ids are
    just our token ids, so `bridge(tokens)` and `run_with_cache(tokens)` work on id tensors."""
    from transformer_lens.model_bridge import TransformerBridge

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"load_transformer_bridge: {directory / 'config.json'} not found")
    tokenizer = None
    if not (directory / "tokenizer.json").is_file():
        tokenizer = _id_tokenizer(json.loads((directory / "config.json").read_text())["vocab_size"])
    bridge = TransformerBridge.boot_transformers(
        str(directory), device=device or "cpu", dtype=dtype, tokenizer=tokenizer
    )
    return bridge


def _id_tokenizer(vocab_size: int):
    """A PreTrainedTokenizerFast whose token i is the string "<i>" (for bridges over tokenizer-less exports)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(vocab_size)}
    core = HFTokenizer(WordLevel(vocab, unk_token="<0>"))
    core.pre_tokenizer = WhitespaceSplit()
    # add_bos_token/name_or_path: TransformerLens otherwise re-loads the tokenizer from its hub name.
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<0>",
        eos_token="<0>",
        pad_token="<0>",
        add_bos_token=True,
        name_or_path="aquainterp/id-tokenizer",
    )


# ---------------------------------------------------------------- `aquainterp export`


def add_arguments(parser) -> None:
    from aquainterp.cli.args import count_int, existing_path
    from aquainterp.cli.rundir import output_path

    parser.add_argument(
        "checkpoint", type=existing_path("dir"),
        help="checkpoint folder written by save_checkpoint (holds step_XXXXXX/), or a nanochat checkpoint folder",
    )
    parser.add_argument("out_dir", type=output_path("dir"),
                        help="where to write the HF NanoChatForCausalLM directory (or nanochat layout): a new or "
                             "empty folder, or one export wrote")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into out_dir even where it holds files export did not write (never the checkpoint)")
    parser.add_argument("--format", choices=("hf", "nanochat"), default="hf",
                        help="hf: NanoChatForCausalLM dir (nanochat-2025-10 models only); nanochat: "
                             "<kind's folder>/<tag>/model_<step>.pt + meta_<step>.json + tokenizer/tokenizer.pkl "
                             "(see --kind)")
    parser.add_argument("--kind", choices=("auto", *KINDS), default="auto",
                        help="--format nanochat: which nanochat folder the model goes in, as nanochat's "
                             "checkpoint_manager names them (base -> base_checkpoints, mid -> mid_checkpoints, "
                             "sft -> chatsft_checkpoints, rl -> chatrl_checkpoints; chat_cli -i base|sft|rl reads "
                             "them); auto (default): the stage the checkpoint records (base when it records none)")
    parser.add_argument("--step", type=count_int(), default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--no-tokenizer", action="store_true", help="export the weights only")
    parser.add_argument(
        "--check", action="store_true", help="reload with transformers and compare logits on random tokens"
    )


EXPORT_OWNER = "aquainterp export"
KINDS = ("base", "mid", "sft", "rl")


def nanochat_kind(requested: str, meta: dict) -> tuple[str, str]:
    """(kind, why) of the nanochat folder an export writes: --kind when given, else the stage the checkpoint
    records (training.loop and training.rl write meta["stage"]), else base."""
    if requested != "auto":
        return requested, "--kind"
    stage = meta.get("stage")
    if stage in KINDS:
        return stage, f"the checkpoint's stage {stage!r}"
    return "base", "no stage recorded in the checkpoint" if stage is None else f"stage {stage!r} is not one of {KINDS}"


def _export_nanochat(args, model, tokenizer, meta) -> int:
    from aquainterp.checkpoints.nanochat import save_nanochat
    from aquainterp.cli.rundir import UsageError

    if args.check:
        raise UsageError("--check compares with transformers; it applies to --format hf only")
    from aquainterp.cli.rundir import HIDDEN

    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(p.name not in HIDDEN for p in out.iterdir())):
        raise UsageError(f"out_dir {out} exists and is not an empty folder; export --format nanochat writes a new one")
    step = int(meta.get("step") or 0)
    # nanochat's own meta fields (val_bpb, user_config, ...) travel along when the model came from nanochat
    source = meta.get("nanochat_meta") or (meta if "nanochat_checkpoint" in meta else {})
    extra = {k: v for k, v in source.items() if k not in ("step", "model_config", "nanochat_checkpoint")}
    kind, why = nanochat_kind(getattr(args, "kind", "auto"), meta)
    folder = save_nanochat(model, out, step, None if args.no_tokenizer else tokenizer, meta_extra=extra, kind=kind)
    print(f"wrote {folder} (nanochat layout, kind {kind} from {why}: chat_cli -i {kind}, {model.config.architecture}, "
          f"{model.num_params():,} parameters"
          f"{', tokenizer in ' + str(out / 'tokenizer') if tokenizer is not None and not args.no_tokenizer else ''})")
    return 0


def run(args) -> int:
    from aquainterp.checkpoints.load import load_model
    from aquainterp.cli.rundir import claim_output, record_written

    # never into (or over) the checkpoint, never over files export did not write (aquainterp.cli.rundir)
    claim_output(args.out_dir, "out_dir", owner=EXPORT_OWNER, kind="dir", inputs=[args.checkpoint],
                 overwrite=getattr(args, "overwrite", False))
    if args.format == "hf" and getattr(args, "kind", "auto") != "auto":
        from aquainterp.cli.rundir import UsageError

        raise UsageError("--kind names nanochat's checkpoint folder; it applies to --format nanochat only")
    model, tokenizer, meta = load_model(args.checkpoint, step=args.step)
    if args.format == "nanochat":
        code = _export_nanochat(args, model, tokenizer, meta)
        record_written([args.out_dir], EXPORT_OWNER)
        return code
    out = export_hf(model, None if args.no_tokenizer else tokenizer, args.out_dir)
    record_written([out], EXPORT_OWNER)
    print(
        f"wrote {out} ({model.num_params():,} parameters{', with tokenizer' if tokenizer and not args.no_tokenizer else ''})"
    )
    if args.check:
        from transformers import NanoChatForCausalLM

        hf = NanoChatForCausalLM.from_pretrained(out).eval()
        idx = torch.randint(0, model.config.vocab_size, (2, min(64, model.config.sequence_len)))
        if model.config.rotary_dtype != "float32":  # HF computes with fp32 tables: compare that math
            print(f"note: this model keeps {model.config.rotary_dtype} rotary tables (nanochat 2c4473d); "
                  "HF NanoChat computes them in float32, the exact math, which the check compares against")
            model.set_rotary_dtype("float32")
        with torch.no_grad():
            diff = (hf(idx).logits - model(idx)).abs().max().item()
        print(f"max |logits(HF) - logits(ours)| = {diff:.2e} on {tuple(idx.shape)} random tokens")
        if diff > 1e-3:
            print("export check FAILED: logits differ by more than 1e-3")
            return 1
    return 0
