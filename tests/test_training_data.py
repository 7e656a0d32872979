"""Training data: packing, resume positions, the one document loader, conversation batches, mixtures."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.data import (
    ConversationBatches,
    DataExhaustedError,
    PackedBatches,
    PackedRows,
    documents,
    inputs_targets,
    micro_steps,
)
from training.mixture import MixtureSpec, build_mixture, parse_styles


def _rows_from(docs):
    """PackedRows over fixed token lists (mask = token is even), encoded as themselves."""
    return lambda position=None: PackedRows(lambda s: iter(docs[s:]), lambda b: [(d, [t % 2 for t in d]) for d in b],
                                            row_len=5, position=position)


@settings(max_examples=40, deadline=None)
@given(docs=st.lists(st.lists(st.integers(0, 99), min_size=1, max_size=12), min_size=1, max_size=30),
       takes=st.lists(st.integers(1, 3), min_size=1, max_size=6), cut=st.integers(0, 5))
def test_packing_is_the_concatenated_stream_and_resumes_anywhere(docs, takes, cut):
    stream = [t for d in docs for t in d]
    make = _rows_from(docs)
    rows = make()
    pos, got = 0, []
    for i, n in enumerate(takes):
        if (pos + n) * 5 > len(stream):
            with pytest.raises(DataExhaustedError, match="ran out of documents"):
                rows.take(n)
            return
        if i == cut:  # resume a fresh reader from the saved position: same continuation
            rows = make(json.loads(json.dumps(rows.state())))
        ids, mask = rows.take(n)
        assert ids.flatten().tolist() == stream[pos * 5:(pos + n) * 5]
        # exact by construction: integer tensors
        assert torch.equal(mask, ids % 2)
        pos += n
        got.append(ids)


def test_position_names_document_and_offset():
    rows = _rows_from([[1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11, 12, 13]])()
    rows.take(1)
    assert rows.state() == {"doc": 1, "offset": 2}
    rows.take(1)
    assert rows.state() == {"doc": 2, "offset": 3}


def test_rank_slices_cover_the_global_batch():
    docs = [list(range(i * 100, i * 100 + 37)) for i in range(20)]
    make = _rows_from(docs)
    single = PackedBatches(make(), total_rows=8, device_batch_size=2, rank=0, world_size=1)
    ranks = [PackedBatches(make(), total_rows=8, device_batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert single.accum == 4 and ranks[0].accum == 2
    for _ in range(2):
        whole = torch.cat([x for x, _ in single.next_step("cpu")])
        parts = torch.cat([x for b in ranks for x, _ in b.next_step("cpu")])
        # exact by construction: integer token rows
        assert torch.equal(whole, parts)
    with pytest.raises(ValueError, match=r"rows per step=8 is not a multiple of --device-batch-size × processes = 3 × 1"):
        micro_steps(8, 3, 1, "rows per step")


def test_inputs_targets_masks_untrained_targets():
    ids = torch.tensor([[5, 6, 7, 8]])
    x, y = inputs_targets(ids, torch.tensor([[0, 0, 1, 1]]))
    assert x.tolist() == [[5, 6, 7]] and y.tolist() == [[-1, 7, 8]]


def test_conversation_batches_pad_and_cycle():
    enc = [([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1]), ([6, 7, 8, 9], [0, 0, 1, 1])]
    b = ConversationBatches(enc, examples_per_step=2, device_batch_size=2, rank=0, world_size=1, pad_id=0)
    (x, y), = b.next_step("cpu")
    assert x.tolist() == [[1, 2], [4, 5]] and y.tolist() == [[2, 3], [5, -1]]
    (x, y), = b.next_step("cpu")  # wraps around to the first conversation
    assert x.tolist() == [[6, 7, 8], [1, 2, 3]] and y.tolist() == [[-1, 8, 9], [2, 3, -1]]
    assert b.state() == {"doc": 4}


def test_local_jsonl_and_parquet_go_through_the_same_loader(tmp_path):
    texts = [f"document number {i}" for i in range(7)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    assert list(documents(str(tmp_path / "a.jsonl"))) == texts
    assert list(documents(str(tmp_path / "a.jsonl"), start=5)) == texts[5:]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_dir = tmp_path / "shards"
    pq_dir.mkdir()
    pq.write_table(pa.table({"text": texts[:4]}), pq_dir / "000.parquet")
    pq.write_table(pa.table({"text": texts[4:]}), pq_dir / "001.parquet")
    assert list(documents(str(pq_dir), start=3)) == texts[3:]


def test_loader_errors_name_the_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        documents(str(tmp_path / "nope.jsonl"))
    (tmp_path / "b.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"b.jsonl: document 0 has no string field 'text'"):
        list(documents(str(tmp_path / "b.jsonl")))
    first = list(zip(range(3), documents("synthetic:3", start=10)))
    assert first == list(zip(range(3), documents("synthetic:3", start=10)))
    assert first[0][1] != next(documents("synthetic:3", start=11))


def test_mixture_styles_sources_and_determinism(shared_data):
    spec = MixtureSpec(synthetic=10, aqua=str(shared_data / "aqua_rat" / "dev.json"), aqua_limit=4,
                       gsm8k=str(shared_data / "gsm8k" / "test.jsonl"), gsm8k_limit=3, styles=("direct", "reasoning"))
    chats = build_mixture(spec)
    assert len(chats) == 17 and chats == build_mixture(spec)
    answers = [c["messages"][1]["content"] for c in chats]
    assert sum(a.startswith("Answer: ") and len(a) == 9 for a in answers) == 7  # direct: 5 synthetic + 2 aqua
    assert all(a.splitlines()[-1].startswith("Answer: ") for a in answers)
    with pytest.raises(ValueError, match="--styles"):
        parse_styles("direct,chatty")
    with pytest.raises(ValueError, match="mixture is empty"):
        build_mixture(MixtureSpec())


def test_bits_per_byte_matches_direct_loss():
    from aquainterp.model.gpt import GPT, GPTConfig
    from aquainterp.tasks.synthetic import corpus
    from aquainterp.tokenizer import Tokenizer
    from training.base import evaluate_bpb
    from training.common import Dist

    tok = Tokenizer.train_from_iterator(corpus(300), vocab_size=512)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)
    texts = list(corpus(3, seed=5))
    dist = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    bpb = evaluate_bpb(model, tok, texts, seq_len=32, batch_size=2, dist=dist, bf16=False)
    # reference: one long sequence, every non-BOS token after the first is a target
    stream = [t for text in texts for t in [tok.bos_token_id, *tok.encode(text)]]
    x, y = torch.tensor([stream[:-1]]), torch.tensor([stream[1:]])
    y[y == tok.bos_token_id] = -1
    # the same 32-token rows, each scored on its own, in one plain loop
    nats = 0.0
    for i in range(0, len(stream) - 1, 32):
        nats += model(x[:, i:i + 32], y[:, i:i + 32], loss_reduction="sum").item()
    assert math.isclose(bpb, nats / (math.log(2) * sum(len(t.encode()) for t in texts)), rel_tol=1e-5)
    assert 0 < bpb < 10
